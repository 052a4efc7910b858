"""Property-based hostility: generated corrupt manifests, damaged shards, malformed raw stays
and random CLI option values. Whatever is generated, medmix answers with success or a
clear ``MedmixError`` (exit code 2 on the command line), never a traceback, within a bounded
time, and never changes a file that existed before the command.

Cases per property are set in ``settings(max_examples=...)`` below (240 in all).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from medmix_datasets.synthetic import write_synthetic_store
from typer.testing import CliRunner

from medmix_core.batch import StoreTensors
from medmix_core.cli import app
from medmix_core.errors import MedmixError
from medmix_core.store import EmbeddingStore

pytestmark = pytest.mark.slow
runner = CliRunner()
SETTINGS = dict(deadline=20_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("prop") / "store", n=80,
                                 teacher_dim=8, seed=3).path


def _fresh_copy(base: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(base, dst)
    return dst


def _open_and_load(path: Path) -> None:
    store = EmbeddingStore.open(path)
    tensors = StoreTensors.from_store(store, teacher=(store.teacher_names() or [None])[0])
    assert tensors.n == store.n_samples


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10 ** 6)
    | st.floats(allow_nan=True, allow_subnormal=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_corrupt_manifests_give_store_errors(base_store, tmp_path, data):
    store = _fresh_copy(base_store, tmp_path / "s")
    man = json.loads((store / "manifest.json").read_text())
    paths = [p for p in _paths(man) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    action = data.draw(st.sampled_from(["replace", "delete"]), label="action")
    parent = man
    for k in path[:-1]:
        parent = parent[k]
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "delete" and isinstance(parent, list):
        parent.pop(path[-1])
    else:
        parent[path[-1]] = data.draw(json_values, label="value")
    (store / "manifest.json").write_text(json.dumps(man))
    try:
        _open_and_load(store)
        event("opened")
    except MedmixError as exc:
        event(type(exc).__name__)


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_damaged_shards_give_store_errors(base_store, tmp_path, data):
    store = _fresh_copy(base_store, tmp_path / "s")
    shards = sorted((store / "shards").rglob("*.safetensors"))
    shard = data.draw(st.sampled_from(shards), label="shard")
    raw = bytearray(shard.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "empty"]), label="how")
    if how == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif how == "append":
        raw += bytes(data.draw(st.binary(min_size=1, max_size=64)))
    else:
        raw = bytearray()
    shard.write_bytes(bytes(raw))
    with pytest.raises(MedmixError):  # every change of a shard is detected
        _open_and_load(store)


stay_lines = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["00:00", "01:30", "47:59", "48:01", "-1:00", "xx", "12"]),
                  st.sampled_from(["HR", "Age", "Gender", "ICUType", "Weight", "pH", "GCS",
                                   "Temp", "Bogus", "", "RecordID"]),
                  st.sampled_from(["80", "-1", "nan", "1e9", "abc", "", "0", "37.2"]))
        .map(",".join),
        st.text(alphabet="0123456789,:.-abc\t ", max_size=20)),
    max_size=12)


@settings(max_examples=60, **SETTINGS)
@given(files=st.lists(stay_lines, min_size=1, max_size=3),
       outcomes=st.sampled_from(["good", "header", "none", "garbage", "mismatch"]))
def test_malformed_raw_stays_give_data_errors(tmp_path, files, outcomes):
    from medmix_datasets.physionet2012 import PhysioNet2012

    src = tmp_path / "src"
    if src.exists():
        shutil.rmtree(src)
    (src / "set-a").mkdir(parents=True)
    ids = [140000 + i for i in range(len(files))]
    for rid, lines in zip(ids, files):
        body = ["Time,Parameter,Value", f"00:00,RecordID,{rid}"] + lines
        (src / "set-a" / f"{rid}.txt").write_text("\n".join(body) + "\n")
    head = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"
    rows = {"good": [f"{r},10,2,5,-1,0" for r in ids], "header": [], "none": None,
            "garbage": ["x,y"], "mismatch": [f"{ids[0] + 999},1,1,1,1,1"]}[outcomes]
    if rows is not None:
        (src / "Outcomes-a.txt").write_text("\n".join([head] + rows) + "\n")
    try:
        ds = PhysioNet2012(str(src))
        samples = ds.samples()
        assert len(samples) == len(ids)
        ds.report()
    except MedmixError:
        pass


def _opt(name: str, values: list) -> st.SearchStrategy:
    return st.one_of(st.just(None), st.sampled_from(values)).map(
        lambda v: [] if v is None else [name, str(v)])


cli_options = st.tuples(
    _opt("--threshold", ["0.3", "val", "2", "0", "-1", "foo", "nan"]),
    _opt("--seeds", ["1", "0", "-2", "x"]),
    _opt("--lr", ["1e-3", "0", "-1", "big"]),
    _opt("--batch-size", ["64", "0", "-5", "1.5"]),
    _opt("--d", ["8", "0", "-1"]),
    _opt("--dropout", ["0.2", "1.0", "-0.5"]),
    _opt("--device", ["cpu", "auto", "cuda", "cuda:3", "tpu", ""]),
    _opt("--fuser", ["medmix", "concat", "nosuchfuser", "medmix,concat", ","]),
    _opt("--experts", ["stats", "nosuchexpert", "", ","]),
    _opt("--fuser-options", ['{"router_hidden": 8}', '{"nope": 1}', "{bad", "[]", "null"]),
    _opt("--keep-modalities", ["mod0", "nosuchmod", ","]),
    _opt("--task", ["target", "nosuchtask"]),
    _opt("--modality-dropout", ["0.1", "1.5"]),
    _opt("--bootstrap", ["0", "-3", "10"]),
)


@settings(max_examples=60, **SETTINGS)
@given(opts=cli_options, out_kind=st.sampled_from(["new", "existing run", "file", "store"]))
def test_random_run_options_never_traceback_or_touch_existing_files(
        base_store, tmp_path_factory, opts, out_kind):
    tmp = tmp_path_factory.mktemp("cli")
    store = _fresh_copy(base_store, tmp / "store")
    existing = tmp / "existing"
    runner.invoke(app, ["run", "--store", str(store), "--epochs", "1", "--d", "4",
                        "--bootstrap", "0", "--out", str(existing)])
    (tmp / "afile").write_text("keep me")
    out = {"new": tmp / "new", "existing run": existing, "file": tmp / "afile",
           "store": store}[out_kind]
    before = {p: _snapshot(p) for p in (store, existing)}
    args = ["run", "--store", str(store), "--epochs", "1", "--patience", "1", "--out", str(out)]
    for o in opts:
        args += o
    res = runner.invoke(app, args)
    event(f"exit {res.exit_code}")
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        args, repr(res.exception))
    assert res.exit_code in (0, 2), (args, res.output)
    assert "Traceback" not in res.output
    for p, snap in before.items():
        assert _snapshot(p) == snap, (args, p)
    assert (tmp / "afile").read_text() == "keep me"
    if res.exit_code == 0:
        assert out_kind == "new" and json.loads((out / "run.json").read_text())[
            "status"] == "complete"
    elif out_kind == "new":
        assert not out.exists() or not any(out.iterdir()), args
