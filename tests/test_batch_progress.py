"""Durable batch progress: a batch killed with ``kill -9`` and run again pays for no input twice.

The batch runs in a child process against the emulator (real HTTP), with its progress in a
folder as under ``output_path``; the child is killed with SIGKILL once a share of the inputs
is recorded, then the batch is run again in a new process. Submits are counted from the
emulator's request log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from airflow_provider_fal.batch.progress import BatchProgress
from airflow_provider_fal.batch.progress_stores import DirectoryProgressStore, SnapshotProgressStore
from airflow_provider_fal.media.storage import LocalStore
from tests.conftest import API_KEY
from tests.test_persist import object_store  # noqa: F401  (a fixture)

MODEL = "fal-ai/fast-sdxl"

CHILD = """
import json, sys
from airflow_provider_fal.batch.inputs import prepare_inputs
from airflow_provider_fal.batch.progress import BatchProgress
from airflow_provider_fal.batch.progress_stores import DirectoryProgressStore
from airflow_provider_fal.batch.runner import FalBatchRunner
from airflow_provider_fal.core.client import FalClient, prepare_request
from airflow_provider_fal.media.storage import LocalStore

config = json.loads(sys.argv[1])
client = FalClient(config["key"], run_url=config["url"], queue_url=config["queue_url"], pool_maxsize=16)
items = prepare_inputs(prepare_request(config["model"]), [{"prompt": f"p{n}"} for n in range(config["total"])])
store = DirectoryProgressStore(LocalStore(__import__("pathlib").Path(config["root"])), "batch")
progress = BatchProgress(store, [item.fingerprint() for item in items], None)
progress.log = __import__("logging").getLogger("child")
runner = FalBatchRunner(client, max_concurrency=16, use_queue=True, poll_interval=0.1, progress_interval=3600)
result = runner.run(items, progress=progress, finish=lambda i, e, err: (progress.finished(i, e), (e, err))[1])
print(json.dumps(result.summary()))
"""


def _child(emulator, root: Path, total: int) -> subprocess.Popen:
    config = {
        "key": API_KEY,
        "url": emulator.url,
        "queue_url": emulator.queue_url,
        "model": MODEL,
        "total": total,
        "root": str(root),
    }
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _states(root: Path) -> Counter:
    """The state of every input's record, as a new process reads them (read only: no checkpoint)."""
    records = DirectoryProgressStore(LocalStore(root), "batch").load()
    return Counter(record.get("state", "unreadable") for record in records.values())


@pytest.mark.parametrize("share", [0.3, 0.6, 0.9])
def test_kill_9_mid_batch_then_run_again_pays_for_every_input_once(emulator, tmp_path, share):
    total = 1000
    emulator.set_queue_timing(queue_wait=0, run_time=0.3)
    child = _child(emulator, tmp_path, total)
    deadline = time.monotonic() + 300
    while sum(_states(tmp_path)[state] for state in ("submitted", "done")) < share * total:
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, _states(tmp_path)
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    at_kill = _states(tmp_path)
    assert at_kill["submitted"] > 0, at_kill  # requests were queued on fal and not finished: reattached below

    second = _child(emulator, tmp_path, total)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    print(f"kill at {share:.0%}: states at the kill {dict(at_kill)}; second run {summary}")

    submitted = Counter(
        r.json["prompt"] for r in emulator.requests if r.method == "POST" and "prompt" in (r.json or {})
    )
    assert max(submitted.values()) == 1, submitted.most_common(3)  # no input sent twice
    # Submits cut off by the kill have no request id: they are reported as unknown (maybe sent and
    # billed; the kill may also have come before the request left), not sent again. Every other
    # input was sent once and has its result.
    unknown = at_kill["submitting"]
    assert total - unknown <= len(submitted) <= total
    assert summary["unknown_submits"] == unknown <= 16  # at most max_concurrency submits in flight
    assert summary["failed"] == unknown and summary["succeeded"] == total - unknown
    assert summary["reused_from_earlier_tries"] == at_kill["done"]
    assert summary["reattached_requests"] == at_kill["submitted"]
    assert _states(tmp_path) == Counter({"done": total - unknown, "failed": unknown})


def test_an_edited_input_is_sent_again_and_a_lost_submit_is_not(tmp_path):
    """Records are matched by fingerprint: a changed input does not reuse the old result; a
    submit whose answer never came (no request id) is reported as unknown, not as never sent."""
    store = DirectoryProgressStore(LocalStore(tmp_path), "batch")
    first = BatchProgress(store, ["a", "b", "c", "d"], log=None)
    first.finished(0, {"index": 0, "ok": True, "output": {"x": 1}, "request_id": "r0"})
    first.submitted(1, "r1")
    first.submitting(2)
    first.finished(3, {"index": 3, "ok": False, "error": {"error": "FalServerError"}, "request_id": "r3"})

    resumed = BatchProgress(store, ["a", "B", "c", "d"], log=None).resume()
    assert resumed.done == {0: {"index": 0, "ok": True, "output": {"x": 1}, "request_id": "r0"}}
    assert resumed.submitted == {}  # input 1 changed since: its old request is not reused
    assert resumed.stale == 1
    assert list(resumed.unknown) == [2]
    assert 3 not in resumed.done and 3 not in resumed.submitted  # a failure is sent again


class MemoryStore:
    where = "memory"

    def __init__(self) -> None:
        self.value = None
        self.saves = 0

    def load(self):
        return self.value

    def save(self, value):
        self.saves += 1
        self.value = json.loads(json.dumps(value))

    def clear(self):
        self.value = None


def test_snapshot_store_groups_concurrent_writes_and_loses_none():
    import threading

    backing = MemoryStore()
    store = SnapshotProgressStore(backing)
    progress = BatchProgress(store, [str(n) for n in range(400)], log=None)
    threads = [
        threading.Thread(target=lambda start=start: [progress.submitted(n, f"r{n}") for n in range(start, 400, 8)])
        for start in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    resumed = BatchProgress(SnapshotProgressStore(backing), [str(n) for n in range(400)], log=None).resume()
    assert resumed.submitted == {n: f"r{n}" for n in range(400)}
    print(f"400 records from 8 threads in {backing.saves} saves")


def test_a_snapshot_store_in_a_new_process_adds_to_what_is_stored_even_from_many_threads():
    """A deferrable batch resumes in a new operator (and process) and records before it reads:
    its first write must keep the records of the rounds before."""
    backing = MemoryStore()
    BatchProgress(SnapshotProgressStore(backing), ["a", "b"], log=None).submitted(0, "r0")
    later = BatchProgress(SnapshotProgressStore(backing), ["a", "b"], log=None)
    later.submitted(1, "r1")  # no resume() first
    assert BatchProgress(SnapshotProgressStore(backing), ["a", "b"], log=None).resume().submitted == {0: "r0", 1: "r1"}

    import threading

    class SlowLoad(MemoryStore):
        def load(self):
            time.sleep(0.05)  # the first writer reads while the others add their records
            return super().load()

    slow = SlowLoad()
    fingerprints = [str(n) for n in range(9)]
    BatchProgress(SnapshotProgressStore(slow), fingerprints, log=None).submitted(0, "r0")
    fresh = BatchProgress(SnapshotProgressStore(slow), fingerprints, log=None)
    threads = [threading.Thread(target=fresh.submitted, args=(n, f"r{n}")) for n in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    resumed = BatchProgress(SnapshotProgressStore(slow), fingerprints, log=None).resume()
    assert resumed.submitted == {n: f"r{n}" for n in range(9)}


@pytest.mark.filterwarnings("ignore::UserWarning")
# "memory" only: the "memtest" filesystem of test_persist is cached by Airflow per protocol, and
# creating it here first left test_persist's own "memtest" tests a stale instance.
@pytest.mark.parametrize("object_store", ["memory"], indirect=True)
def test_progress_and_manifest_on_object_storage(object_store):  # noqa: F811
    """Records and the manifest through Airflow's ObjectStoragePath (an in-memory fsspec store)."""
    from airflow_provider_fal.batch.manifest import read_manifest, write_manifest
    from airflow_provider_fal.media.storage import open_store

    store = open_store(object_store)
    progress = BatchProgress(DirectoryProgressStore(store, "task__abc"), ["a", "b", "c"], log=None)
    assert progress.resume().done == {}  # nothing there yet
    progress.finished(0, {"index": 0, "ok": True, "output": {"v": 0}, "request_id": "r0"})
    progress.submitted(2, "r2")
    again = BatchProgress(DirectoryProgressStore(open_store(object_store), "task__abc"), ["a", "b", "c"], log=None)
    resumed = again.resume()
    assert list(resumed.done) == [0] and resumed.submitted == {2: "r2"}

    entries = [
        {"index": 0, "ok": True, "output": {"v": 0}, "request_id": "r0"},
        {"index": 1, "ok": False, "error": {"error": "FalServerError"}, "request_id": None},
    ]
    location = write_manifest(store, "task__manifest.jsonl", entries, ["a", "b"])
    assert location == str(object_store / "task__manifest.jsonl")
    lines = read_manifest(location)
    assert [(line["index"], line["ok"], line["fingerprint"]) for line in lines] == [(0, True, "a"), (1, False, "b")]
    assert lines[0]["output"] == {"v": 0} and lines[1]["error"] == {"error": "FalServerError"}


def _objects(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_records_of_concurrent_threads_are_group_committed_and_a_later_one_wins(tmp_path):
    """32 threads writing 3 records each per input: far fewer objects than records, none lost,
    and each input's last record is the one read back."""
    import threading

    store = DirectoryProgressStore(LocalStore(tmp_path), "batch")
    fingerprints = [str(n) for n in range(640)]
    progress = BatchProgress(store, fingerprints, log=None)

    def one_thread(start: int) -> None:
        for n in range(start, 640, 32):
            progress.submitting(n)
            progress.submitted(n, f"r{n}")
            if n % 2:
                progress.finished(n, {"index": n, "ok": True, "output": {"n": n}, "request_id": f"r{n}"})

    threads = [threading.Thread(target=one_thread, args=(start,)) for start in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    folder = tmp_path / "fal-batch-progress" / "batch"
    (log,) = _objects(folder)  # on a local disk: one log for the writer, a line per group
    groups = (folder / log).read_bytes().count(b"\n")
    print(f"{640 * 2 + 320} records from 32 threads in {groups} groups ({store.saves} saves)")
    assert groups == store.saves < 640 * 2 + 320
    resumed = BatchProgress(DirectoryProgressStore(LocalStore(tmp_path), "batch"), fingerprints, log=None).resume()
    assert resumed.submitted == {n: f"r{n}" for n in range(0, 640, 2)}
    assert sorted(resumed.done) == list(range(1, 640, 2)) and not resumed.unknown


def test_reading_folds_many_groups_into_a_checkpoint_and_keeps_old_per_input_records(tmp_path):
    folder = tmp_path / "fal-batch-progress" / "batch"
    folder.mkdir(parents=True)
    # An earlier version's records: one file per input.
    old = {"fingerprint": "f0", "try": 1, "state": "submitted", "request_id": "r0"}
    (folder / "0.json").write_text(json.dumps(old))
    (folder / "1.json").write_text(json.dumps({"fingerprint": "f1", "try": 1, "state": "submitting", "at": "then"}))
    fingerprints = [f"f{n}" for n in range(60)]
    writer = BatchProgress(DirectoryProgressStore(LocalStore(tmp_path), "batch"), fingerprints, log=None)
    for n in range(2, 60):  # one thread: one group per record, a line each in the writer's log
        writer.submitted(n, f"r{n}")
    assert [name[0] for name in _objects(folder)] == ["0", "1", "l"]

    reader = BatchProgress(DirectoryProgressStore(LocalStore(tmp_path), "batch"), fingerprints, log=None)
    first = reader.resume()  # reads 2 objects and 58 lines: one checkpoint, deletes the objects it holds
    assert [name[0] for name in _objects(folder)] == ["c", "l"]  # a log is never deleted
    checkpoint, log = _objects(folder)
    assert json.loads((folder / checkpoint).read_bytes())["logs"] == {log: (folder / log).stat().st_size}
    assert first.submitted == {n: f"r{n}" for n in range(60) if n != 1} and list(first.unknown) == [1]

    reader.finished(5, {"index": 5, "ok": True, "output": {"v": 5}, "request_id": "r5"})  # after the checkpoint
    again = BatchProgress(DirectoryProgressStore(LocalStore(tmp_path), "batch"), fingerprints, log=None).resume()
    assert list(again.done) == [5] and 5 not in again.submitted
    assert again.submitted == {n: f"r{n}" for n in range(60) if n not in (1, 5)}


def test_a_group_written_late_by_another_process_is_read_after_the_checkpoint(tmp_path):
    """A try still running (a zombie) writes a group numbered before a checkpoint another try
    made meanwhile: it is not in the checkpoint, so it is read after it, never skipped."""
    fingerprints = [f"f{n}" for n in range(40)]
    folder = tmp_path / "fal-batch-progress" / "batch"

    def progress() -> BatchProgress:
        return BatchProgress(DirectoryProgressStore(LocalStore(tmp_path), "batch"), fingerprints, log=None)

    zombie = progress()
    zombie.submitted(0, "r0")  # numbers its groups from here on
    for n in range(1, 39):
        progress().submitted(n, f"r{n}")
    retry = progress()
    assert len(retry.resume().submitted) == 39
    assert sorted({name[0] for name in _objects(folder)}) == ["c", "l"]
    zombie.submitted(39, "r39")  # appended to its log after the checkpoint read it, numbered below
    assert progress().resume().submitted == {n: f"r{n}" for n in range(40)}


def test_a_line_cut_short_or_not_readable_yet_is_never_read_or_held_by_a_checkpoint(tmp_path):
    """A kill mid-append leaves a line without its newline; a network disk may show a line's
    bytes before the bytes ahead of it. Neither is read, nor folded into a checkpoint, nor
    skipped: once the line is whole, it and every line after it are read."""
    from airflow_provider_fal.batch.progress_log import encode_line

    fingerprints = [f"f{n}" for n in range(40)]
    folder = tmp_path / "fal-batch-progress" / "batch"
    writer = BatchProgress(DirectoryProgressStore(LocalStore(tmp_path), "batch"), fingerprints, log=None)
    for n in range(36):
        writer.submitted(n, f"r{n}")
    (log,) = _objects(folder)
    whole = encode_line(100, {36: {"fingerprint": "f36", "try": 0, "state": "submitted", "request_id": "r36"}})
    after = encode_line(101, {37: {"fingerprint": "f37", "try": 0, "state": "submitted", "request_id": "r37"}})
    with open(folder / log, "ab") as handle:
        handle.write(b"\0" * 20 + whole[20:] + after)  # the first 20 bytes of a line not there yet

    def resume():
        return BatchProgress(DirectoryProgressStore(LocalStore(tmp_path), "batch"), fingerprints, log=None).resume()

    assert resume().submitted == {n: f"r{n}" for n in range(36)}  # reads 36 lines: folds them
    assert sorted(name[0] for name in _objects(folder)) == ["c", "l"]
    data = (folder / log).read_bytes()
    (folder / log).write_bytes(data[: -len(whole) - len(after)] + whole + after[:-5])  # now whole; the next cut short
    assert resume().submitted == {n: f"r{n}" for n in range(37)}
    (folder / log).write_bytes(data[: -len(whole) - len(after)] + whole + after)
    assert resume().submitted == {n: f"r{n}" for n in range(38)}


def test_a_writer_whose_append_failed_moves_to_a_new_log_and_loses_nothing(tmp_path):
    from airflow_provider_fal.batch.progress_log import log_name

    fingerprints = ["f0", "f1"]
    folder = tmp_path / "fal-batch-progress" / "batch"
    store = DirectoryProgressStore(LocalStore(tmp_path), "batch")
    (folder / log_name(store._writer, 0)).mkdir(parents=True)  # its log cannot be opened
    writer = BatchProgress(store, fingerprints, log=None)
    writer.submitted(0, "r0")  # fails: logged, the record waits for the next save
    writer.submitted(1, "r1")
    assert (folder / log_name(store._writer, 1)).read_bytes().count(b"\n") == 1
    resumed = BatchProgress(DirectoryProgressStore(LocalStore(tmp_path), "batch"), fingerprints, log=None).resume()
    assert resumed.submitted == {0: "r0", 1: "r1"}


def test_a_failed_group_save_is_reported_to_its_writer_and_saved_by_the_next(tmp_path):
    from airflow_provider_fal.batch.group_commit import GroupCommit

    saved: list[dict] = []
    failures = [OSError("disk full")]

    def save(group: dict) -> None:
        if failures:
            raise failures.pop()
        saved.append(dict(group))

    commit = GroupCommit(save)
    with pytest.raises(OSError):
        commit.write(0, {"state": "submitting"})
    commit.write(1, {"state": "submitting"})
    assert saved == [{0: {"state": "submitting"}, 1: {"state": "submitting"}}]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("object_store", ["memory"], indirect=True)
def test_group_commit_and_checkpoints_on_object_storage(object_store):  # noqa: F811
    """No append on object storage: every group is a new object; a checkpoint replaces them."""
    from airflow_provider_fal.batch.progress_stores import COMPACT_AFTER
    from airflow_provider_fal.media.storage import open_store

    fingerprints = [str(n) for n in range(COMPACT_AFTER + 8)]
    writer = BatchProgress(DirectoryProgressStore(open_store(object_store), "task__def"), fingerprints, log=None)
    for n in range(len(fingerprints)):
        writer.submitted(n, f"r{n}")
    folder = object_store / "fal-batch-progress" / "task__def"
    assert len(list(folder.iterdir())) == len(fingerprints)
    reader = BatchProgress(DirectoryProgressStore(open_store(object_store), "task__def"), fingerprints, log=None)
    assert reader.resume().submitted == {n: f"r{n}" for n in range(len(fingerprints))}
    assert [path.name[0] for path in folder.iterdir()] == ["c"]
    reader.finished(3, {"index": 3, "ok": True, "output": {"v": 3}, "request_id": "r3"})
    again = BatchProgress(DirectoryProgressStore(open_store(object_store), "task__def"), fingerprints, log=None)
    resumed = again.resume()
    assert list(resumed.done) == [3] and len(resumed.submitted) == len(fingerprints) - 1
