"""EmbeddingStore: round trip and every corruption case gives a clear error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medmix_core import EmbeddingStore, StoreWriter
from medmix_core.errors import StoreError
from medmix_core.files import sha256_file


@pytest.fixture()
def store(tmp_path, synth_store_path):
    dst = tmp_path / "store"
    shutil.copytree(synth_store_path, dst)
    return dst


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _first_shard(path):
    return path / _manifest(path)["experts"]["mod0"][0]["shards"][0]["file"]


def test_round_trip_preserves_embeddings_masks_labels_splits(tmp_path):
    w = StoreWriter(tmp_path / "s")
    from medmix_core.store import EncoderEntry
    from medmix_core.types import ModalitySpec, TaskSpec

    emb = np.arange(20, dtype=np.float32).reshape(5, 4)
    mask = np.array([1, 0, 1, 1, 0], bool)
    rec = w.write_shard(w.shard_path("m", "e", 0), emb, mask)
    lab, sha = w.write_labels({"y": np.array([0, 1, np.nan, 1, 0], np.float32)})
    entry = EncoderEntry("m", "e", 4, "expert", "domain", {"expert": "e"},
                         [{**rec, "start": 0, "stop": 5}])
    w.write_manifest(sample_ids=list("abcde"), modalities=[ModalitySpec("m", "tabular")],
                     tasks=[TaskSpec("y", "binary")], splits={"train": [0, 1], "val": [2],
                                                              "test": [3, 4]},
                     experts={"m": [entry]}, teachers={}, labels_file=lab, labels_sha256=sha,
                     dataset={"name": "t"})
    st = EmbeddingStore.open(tmp_path / "s", verify=True)
    e, m = st.load(st.entry("m", "e"))
    assert torch.equal(m, torch.tensor(mask))
    assert torch.equal(e[m], torch.tensor(emb[mask]))
    assert torch.all(e[~m] == 0)  # masked rows are stored as zeros, never read without mask
    y = st.labels("y")
    assert torch.isnan(y[2]) and y[1] == 1
    assert st.splits == {"train": [0, 1], "val": [2], "test": [3, 4]}
    assert st.sample_ids == list("abcde")
    assert not list((tmp_path / "s").rglob("*.tmp"))


def test_missing_store_says_how_to_create_one(tmp_path):
    with pytest.raises(StoreError, match="medmix extract"):
        EmbeddingStore.open(tmp_path / "nothing")


def test_folder_without_manifest_is_an_interrupted_extraction(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(StoreError, match="interrupted"):
        EmbeddingStore.open(tmp_path / "half")


def test_corrupt_manifest(store):
    (store / "manifest.json").write_text('{"format": "medmix-store", ')
    with pytest.raises(StoreError, match="manifest.json: manifest is not valid JSON"):
        EmbeddingStore.open(store)


def test_missing_shard(store):
    shard = _first_shard(store)
    shard.unlink()
    with pytest.raises(StoreError, match=f"{shard.name}: file listed in the manifest is missing"):
        EmbeddingStore.open(store)


def test_truncated_shard(store):
    shard = _first_shard(store)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated"):
        EmbeddingStore.open(store)


def test_corrupt_shard_header_same_size(store):
    shard = _first_shard(store)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"x" * 32  # garble the JSON header, keep the size
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="not a readable safetensors file"):
        EmbeddingStore.open(store)


def test_flipped_bytes_are_caught_by_verify(store):
    shard = _first_shard(store)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    EmbeddingStore.open(store)  # size and header still fine
    with pytest.raises(StoreError, match="sha256 differs"):
        EmbeddingStore.open(store, verify=True)


def test_shape_mismatch_between_manifest_and_shard(store):
    man = _manifest(store)
    man["experts"]["mod0"][0]["dim"] += 1
    (store / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match=r"expected emb \[\d+, \d+\]"):
        EmbeddingStore.open(store)


def test_mismatched_ids_and_labels(store):
    man = _manifest(store)
    man["sample_ids"] = man["sample_ids"][:-1]
    n = len(man["sample_ids"])
    man["splits"] = {k: [i for i in v if i < n] for k, v in man["splits"].items()}
    (store / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="rows, expected"):
        EmbeddingStore.open(store)


def test_duplicate_ids(store):
    man = _manifest(store)
    man["sample_ids"][1] = man["sample_ids"][0]
    (store / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="not unique"):
        EmbeddingStore.open(store)


def test_nan_in_a_present_row_is_reported_with_the_file(store):
    from safetensors.torch import load_file, save_file

    shard = _first_shard(store)
    t = load_file(str(shard))
    row = int(torch.nonzero(t["mask"])[0])
    t["emb"][row, 0] = float("nan")
    save_file(t, str(shard))
    man = _manifest(store)
    man["experts"]["mod0"][0]["shards"][0]["bytes"] = shard.stat().st_size
    man["experts"]["mod0"][0]["shards"][0]["sha256"] = sha256_file(shard)  # a valid record
    (store / "manifest.json").write_text(json.dumps(man))
    st = EmbeddingStore.open(store)
    with pytest.raises(StoreError, match="1 present rows hold NaN or Inf"):
        st.load(st.entry("mod0", "e0"))


def test_writer_refuses_nan_in_present_rows_and_shape_errors(tmp_path):
    w = StoreWriter(tmp_path)
    with pytest.raises(StoreError, match="NaN/Inf"):
        w.write_shard("x.safetensors", np.array([[np.nan]], np.float32), np.array([True]))
    w.write_shard("ok.safetensors", np.array([[np.nan]], np.float32), np.array([False]))
    with pytest.raises(StoreError, match=r"expected emb \[n, d\]"):
        w.write_shard("y.safetensors", np.zeros((3, 2), np.float32), np.ones(2, bool))


def test_incomplete_shards_are_reported(store):
    man = _manifest(store)
    man["experts"]["mod0"][0]["shards"][0]["stop"] -= 1
    (store / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError):
        EmbeddingStore.open(store)


def test_not_a_store_format(store):
    man = _manifest(store)
    man["format"] = "something-else"
    (store / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="not a medmix store"):
        EmbeddingStore.open(store)
