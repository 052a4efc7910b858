"""`medmix extract` in several processes (torchrun, gloo): byte-identical to one process,
resumable after a kill, and a failing rank stops every rank.

The distributed runs are real processes started by ``python -m torch.distributed.run``:
either the ``medmix`` console script (``--no-python``), or this file as the worker script,
which wraps ``stats`` to log its fit and encode calls per rank (and to be slowed down, or
to fail on one rank) and then calls :func:`extract` with what the command line asks for.
Wrapping the methods keeps the class, so the store (cache keys, provenance) is the one
plain ``medmix extract`` writes, and either can resume the other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from medmix_datasets.physionet2012 import write_subset

from medmix_core import extract as extract_module
from medmix_core.distributed import Dist
from medmix_core.extract import (
    PART_GLOB,
    STATE_FILE,
    ExtractError,
    _all_passed,
    _on_main,
    extract,
)
from medmix_core.lock import LOCK_NAME, LockedError
from medmix_core.store import EmbeddingStore

N = 24
SHARD = 4  # 6 shards per job: 3 per rank
SEQSSL = {"hidden": 4, "epochs": 0, "bin_hours": 12}  # its network state, without training
HERE = Path(__file__).resolve()


def cli_args(out: Path, source: str) -> list[str]:
    """``medmix extract`` with experts that all fit state on the training rows: stats and
    grid (normalisation), seqssl (a network trained by fit) and a stats teacher."""
    return ["extract", "--dataset", "physionet2012", "--source", source,
            "--experts", "stats,grid,seqssl", "--teacher", "stats",
            *(f"--expert-option=seqssl.{k}={v}" for k, v in SEQSSL.items()),
            "--shard-size", str(SHARD), "--out", str(out), "--device", "cpu", "--no-progress"]


def one_process(out: Path, source: str) -> Path:
    """The same extraction in this process (a world of one)."""
    return extract("physionet2012", out, ["stats", "grid", "seqssl"], teachers=["stats"],
                   source=source, shard_size=SHARD, progress=False,
                   expert_options={"seqssl": SEQSSL}).path


# ---------------------------------------------------------------------- running, comparing
def _env() -> dict[str, str]:
    # a bug must fail the test, not wait half an hour at a barrier
    return {**os.environ, "OMP_NUM_THREADS": "1", "MEDMIX_DIST_TIMEOUT": "120",
            "PYTHONUNBUFFERED": "1"}


def torchrun(*argv: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node=2", *argv]


def worker(out: Path, source: str, log: Path, **knobs: float) -> list[str]:
    """This file as torchrun's script. Positional arguments only: torchrun would take an
    option such as ``--log`` for an abbreviation of one of its own."""
    return [str(HERE), str(log), str(out), source, *(f"{k}={v}" for k, v in knobs.items())]


def medmix_script() -> Path:
    medmix = Path(sys.executable).with_name("medmix")
    if not medmix.is_file():
        pytest.skip("the medmix console script is not installed next to this Python")
    return medmix


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def tree(path: Path) -> dict[str, bytes]:
    """Every file of a store but its lock, by relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def no_timing(obj):
    """A manifest or state without the fit wall time seqssl records in its provenance."""
    if isinstance(obj, dict):
        return {k: no_timing(v) for k, v in obj.items() if k != "fit_seconds"}
    if isinstance(obj, list):
        return [no_timing(v) for v in obj]
    return obj


TIMED = ("manifest.json", STATE_FILE)


def assert_same_store(a: Path, b: Path) -> None:
    """Every shard, fitted state and the labels byte for byte; the manifest and the state
    differ at most in seqssl's fit wall time (a measurement, not a result)."""
    ta, tb = tree(a), tree(b)
    assert ta.keys() == tb.keys()  # no part file or temp file is left behind
    assert [k for k in ta if k not in TIMED and ta[k] != tb[k]] == []
    for k in TIMED:
        assert no_timing(json.loads(ta[k])) == no_timing(json.loads(tb[k]))


def shard_ids(path: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every shard file: a rewritten shard gets a new inode."""
    return {str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for folder in ("shards", "teachers") if (path / folder).is_dir()
            for p in sorted((path / folder).rglob("*.safetensors"))}


def recorded(path: Path) -> set[str]:
    """The shard files recorded as finished in the state and in every rank's part file."""
    files = set()
    for f in [path / STATE_FILE, *path.glob(PART_GLOB)]:
        for entry in json.loads(f.read_text())["encoders"].values():
            files |= {r["file"] for r in entry["shards"]}
    return files


def calls(log: Path) -> dict[int, list[str]]:
    """The logged fit and encode calls of stats, per rank."""
    return {int(p.stem[4:]): p.read_text().split() for p in sorted(log.glob("rank*.log"))}


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory):
    """A hash cache of this module's own (every rank inherits it): a shared one that other
    tests filled makes each new hash cost a rewrite of the whole cache file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDMIX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(write_subset(tmp_path_factory.mktemp("p12") / "cohort", N))


@pytest.fixture(scope="module")
def baseline(source, tmp_path_factory):
    """One uninterrupted one-process extraction."""
    return one_process(tmp_path_factory.mktemp("one") / "s", source)


# ---------------------------------------------------------------------- the tests
@pytest.mark.slow
def test_a_killed_run_resumes_byte_identical_without_redoing_shards(source, baseline,
                                                                     tmp_path):
    out, log = tmp_path / "s", tmp_path / "log"
    log.mkdir()
    with open(tmp_path / "killed.txt", "w") as sink:
        proc = subprocess.Popen(torchrun(*worker(out, source, log, delay=0.05)), env=_env(),
                                stdout=sink, stderr=subprocess.STDOUT, process_group=0)
        try:
            deadline = time.monotonic() + 180
            while len(list(out.glob("shards/*/stats/*.safetensors"))) < 12:
                assert proc.poll() is None, (tmp_path / "killed.txt").read_text()
                assert time.monotonic() < deadline, "no shards written in time"
                time.sleep(0.02)
        finally:
            # torchrun puts each worker in a process group of its own: kill them by pid, then it
            for p in log.glob("pid*"):
                try:
                    os.kill(int(p.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "manifest.json").exists()
    assert any(out.glob(PART_GLOB)), "rank 1 recorded no shard before the kill"
    done = recorded(out)
    before = shard_ids(out)
    assert done and done <= before.keys()
    log_of = calls(log)
    assert "fit" in log_of[0] and "fit" not in log_of.get(1, [])  # fitted once, by rank 0

    # the same command again, now plain `torchrun ... --no-python medmix extract`
    again = run(torchrun("--no-python", str(medmix_script()), *cli_args(out, source)))
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_store(out, baseline)
    after = shard_ids(out)
    # the recorded shards were kept as they were; exactly the others were (re)written
    assert [f for f in done if after[f] != before[f]] == []
    assert {f for f in after if before.get(f) != after[f]} == after.keys() - done
    EmbeddingStore.open(out, verify=True)


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_and_one_process_resumes(source, baseline, tmp_path):
    out, log = tmp_path / "s", tmp_path / "log"
    log.mkdir()
    started = time.monotonic()
    got = run(torchrun(*worker(out, source, log, fail_rank=1, fail_after=2)), timeout=180)
    output = got.stdout + got.stderr
    assert got.returncode != 0, output
    assert time.monotonic() - started < 150  # nobody waited at a barrier for the timeout
    assert "simulated failure on rank 1" in output
    assert "rank 1 of 2 failed" in output  # rank 0's own message names the failing rank
    assert not (out / "manifest.json").exists()
    part = json.loads((out / PART_GLOB.replace("*", "1")).read_text())
    theirs = {r["file"] for e in part["encoders"].values() for r in e["shards"]}
    assert len(theirs) == 2  # rank 1 finished two shards before it failed
    done, before = recorded(out), shard_ids(out)
    assert theirs < done

    # the same extraction in one process merges rank 1's records and keeps their shards
    assert_same_store(one_process(out, source), baseline)
    assert not list(out.glob(PART_GLOB))
    after = shard_ids(out)
    assert [f for f in done if after[f] != before[f]] == []


class Peer(Dist):
    """This rank of two, whose collectives return what the other rank sends (``sent``)."""

    def __init__(self, rank: int, sent) -> None:
        super().__init__(rank, 2, rank, "gloo")
        self.sent, self.got = sent, None

    def gather(self, obj):
        self.got = obj
        return [obj, self.sent] if self.rank == 0 else [self.sent, obj]

    def broadcast(self, obj, src=0):
        self.got = obj
        return obj if self.rank == src else self.sent


def test_a_failure_on_rank_0_stops_the_others_with_its_message():
    def take_lock():
        raise LockedError("s: this store is being written by pid 7")

    main = Peer(0, None)
    with pytest.raises(LockedError):
        _on_main(main, "while opening the store", take_lock)
    assert main.got["error"] == "LockedError: s: this store is being written by pid 7"
    other = Peer(1, main.got)
    with pytest.raises(ExtractError, match=r"opening the store: rank 0 of 2 failed "
                                           r"\(LockedError: s: this store is being written"):
        _on_main(other, "while opening the store", take_lock)
    assert _on_main(Peer(1, {"error": None, "value": 3}), "", take_lock) == 3


def test_a_failure_on_any_rank_stops_every_rank_at_the_sync_point():
    boom = RuntimeError("out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):  # its own error, unchanged
        _all_passed(Peer(1, (None, [])), boom, "while encoding x")
    with pytest.raises(ExtractError, match=r"encoding x: rank 1 of 2 failed \(RuntimeError"):
        _all_passed(Peer(0, ("RuntimeError: out of memory", None)), None, "while encoding x")
    assert _all_passed(Peer(0, (None, ["b"])), None, "", ["a"]) == [["a"], ["b"]]
    assert _all_passed(Dist(), None, "", "a") == ["a"]  # a world of one: no collective


def test_a_rank_that_does_not_see_the_store_says_it_must_be_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module, "_SEE_TRIES", 1)
    with pytest.raises(ExtractError, match="every node of the run shares"):
        extract_module._see_store(tmp_path, Peer(1, None))
    (tmp_path / STATE_FILE).write_text("{}")
    extract_module._see_store(tmp_path, Peer(1, None))


# ---------------------------------------------------------------------- the worker
def main(argv: list[str]) -> None:
    """One rank of a test extraction (torchrun runs this file):
    ``LOG OUT SOURCE [delay=S] [fail_rank=R] [fail_after=K]``; the extraction is
    :func:`one_process`'s, which is what :func:`cli_args` asks the CLI for."""
    from medmix_experts.stats import StatsExpert

    log, out, source, *knobs = argv
    rank = int(os.environ.get("RANK", "0"))
    Path(log, f"pid{rank}").write_text(str(os.getpid()))
    opts = {k: float(v) for k, _, v in (knob.partition("=") for knob in knobs)}
    fit, encode, encodes = StatsExpert.fit, StatsExpert.encode, [0]

    def note(word: str) -> None:
        with open(Path(log, f"rank{rank}.log"), "a") as fh:
            fh.write(word + "\n")

    def logged_fit(self, modality, payloads):
        note("fit")
        return fit(self, modality, payloads)

    def logged_encode(self, modality, payloads):
        encodes[0] += 1
        if rank == opts.get("fail_rank") and encodes[0] > opts.get("fail_after", 0):
            raise RuntimeError(f"simulated failure on rank {rank}")
        time.sleep(opts.get("delay", 0.0))
        note("encode")
        return encode(self, modality, payloads)

    StatsExpert.fit, StatsExpert.encode = logged_fit, logged_encode
    one_process(Path(out), source)


if __name__ == "__main__":
    main(sys.argv[1:])
