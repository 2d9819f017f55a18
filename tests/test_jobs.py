"""The job queue and the export queue: states, retries with backoff, recovery, resend."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.config import Destination
from node.storage.deliveries import ExportQueue
from node.storage.jobs import JobQueue


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    jobs = JobQueue(tmp_path / "index.sqlite", max_attempts=3, backoff_seconds=10)
    yield jobs
    jobs.close()


def _submit(queue: JobQueue, version: int = 1):
    return queue.submit("dixon:1", "dixon", "9", {"water": "1", "fat": "2"}, {"1": version, "2": 1}, "ORTHANC", "127.0.0.1")


def test_submit_is_idempotent_and_a_change_supersedes(queue: JobQueue) -> None:
    first = _submit(queue)
    assert first.state == "queued" and _submit(queue) is None
    second = _submit(queue, version=2)
    assert queue.get(first.id).state == "superseded" and second.state == "queued"
    assert queue.counts()["queued"] == 1 and queue.counts()["superseded"] == 1


def test_claim_finish_and_stale_finish(queue: JobQueue) -> None:
    job = _submit(queue)
    claimed = queue.claim("w0")
    assert claimed.id == job.id and claimed.state == "running" and claimed.attempts == 1
    assert queue.claim("w1") is None
    _submit(queue, version=2)  # the series changed while it ran
    assert not queue.finish(job.id, {"files": 3})
    assert queue.get(job.id).state == "superseded"


def test_transient_failures_back_off_then_fail(queue: JobQueue) -> None:
    job = _submit(queue)
    now = time.time()
    for attempt in (1, 2):
        queue.claim("w0", now=now + 10_000 * attempt)
        before = time.time()
        failed = queue.fail(job.id, "disk busy", transient=True)
        assert failed.state == "queued" and f"attempt {attempt} failed" in failed.reason
        assert failed.not_before >= before + 10 * 2 ** (attempt - 1)
        assert queue.claim("w0", now=before) is None  # not due yet
    queue.claim("w0", now=now + 100_000)
    final = queue.fail(job.id, "disk busy", transient=True)
    assert final.state == "failed" and "failed 3 times" in final.reason
    again = queue.retry(job.id)
    assert again.state == "queued" and again.attempts == 0


def test_permanent_failure_and_crash_recovery(queue: JobQueue) -> None:
    job = _submit(queue)
    queue.claim("w0")
    assert queue.fail(job.id, "not a lumbar image", transient=False).state == "failed"
    other = queue.submit("t2:5", "t2", "9", {"t2": "5"}, {"5": 1})
    queue.claim("w0")
    assert queue.requeue_interrupted() == 1
    assert queue.get(other.id).state == "queued" and "interrupted" in queue.get(other.id).reason
    with pytest.raises(ValueError, match="only failed or done"):
        queue.retry(other.id)


def test_export_queue_backoff_and_resend(tmp_path: Path) -> None:
    exports = ExportQueue(tmp_path / "index.sqlite", tmp_path)
    pacs = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
    exports.add(7, [("1.2.1", "1.2.840.10008.5.1.4.1.1.66.4", "results/a.dcm", "seg"),
                    ("1.2.2", "1.2.840.10008.5.1.4.1.1.88.34", "results/b.dcm", "sr")], [pacs])
    due = exports.due()
    assert [d.sop_instance_uid for d in due["pacs"]] == ["1.2.1", "1.2.2"]
    before = time.time()
    exports.mark_failed([due["pacs"][0].id], "no association")
    assert [d.sop_instance_uid for d in exports.due(now=before)["pacs"]] == ["1.2.2"]
    assert exports.counts()["retrying"] == 1
    later = before + 3600  # past any first retry delay
    assert "1.2.1" in [d.sop_instance_uid for d in exports.due(now=later)["pacs"]]
    exports.mark_sent([d.id for d in exports.due(now=later)["pacs"]])
    assert exports.counts() == {"pending": 0, "sent": 2, "retrying": 0}
    assert exports.resend(7, Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=104)) == 2
    assert len(exports.due()["archive"]) == 2
    with pytest.raises(KeyError):
        exports.resend(8, pacs)
    exports.close()


def test_a_destination_that_cannot_be_reached_backs_off_without_stopping_the_round(tmp_path: Path) -> None:
    """A host name that does not resolve raises inside pynetdicom; that destination's deliveries
    wait with their backoff and the round goes on to the next destination."""
    from node.network.export import Exporter
    from tests.peers import free_port

    exports = ExportQueue(tmp_path / "index.sqlite", tmp_path)
    nowhere = Destination(name="nowhere", ae_title="PACS", host="no-such-host.invalid", port=104)
    closed = Destination(name="closed", ae_title="PACS", host="127.0.0.1", port=free_port())
    exports.add(1, [("1.2.1", "1.2.840.10008.5.1.4.1.1.66.4", "results/a.dcm", "seg")], [nowhere, closed])
    exporter = Exporter(exports, "MUSCLENODE")
    exporter.send_due()  # raises nothing
    deliveries = {d.destination: d for d in exports.for_job(1)}
    assert {name: (d.state, d.attempts) for name, d in deliveries.items()} == {
        "nowhere": ("pending", 1), "closed": ("pending", 1)}
    assert deliveries["nowhere"].last_error and deliveries["closed"].last_error
    assert exports.due() == {}  # both wait for their retry time
    exports.close()
