"""The batch rules every host applies (daemon/hosts/base.py): a failed prepare fails its record
alone, a full disk stays transient wherever the prepare ran, and one answer per record."""

from __future__ import annotations

import errno

import pytest

from daemon.hosts.base import PreparedBatch, check_outputs
from daemon.runtime.failures import RECORD, TRANSIENT, classify, transient_reason
from stages.base import StageError
from tests.daemon.hosts.ray.test_worker_lost import FakeRemoteHost, run_worker


def test_a_failed_prepare_holds_its_slot_and_the_others_go_to_the_model():
    batch = PreparedBatch.of([{"id": "a"}, ValueError("bad frame"), {"id": "c"}])
    assert (batch.ready, batch.prepared) == ([0, 2], [{"id": "a"}, {"id": "c"}])
    [(index, error)] = list(batch.errors())
    assert (index, error.error_type, error.message) == (1, "ValueError", "bad frame")
    assert classify(error) == RECORD
    assert batch.fill([{"out": 1}, {"out": 3}]) == [{"out": 1}, error, {"out": 3}]
    with pytest.raises(RuntimeError, match="stage returned 1 results for 2 records; expected one per record"):
        PreparedBatch.of([{}, {}]).fill([{}])


def test_a_full_disk_in_prepare_stays_transient_in_its_slot():
    """A Ray actor sends a prepare's failure back as a StageError in its slot: ENOSPC there must
    still pause and retry (as on the local host), not fail the record."""
    [(_, error)] = list(PreparedBatch.of([OSError(errno.ENOSPC, "No space left on device")]).errors())
    assert (error.error_type, error.errno, transient_reason(error)) == ("OSError", errno.ENOSPC, "disk_full")
    assert classify(error) == TRANSIENT
    [(_, missing)] = list(PreparedBatch.of([FileNotFoundError(errno.ENOENT, "no such file")]).errors())
    assert classify(missing) == RECORD  # the record's own file: its error


def test_check_outputs_names_the_call():
    assert check_outputs([1, 2], 2) == [1, 2]
    with pytest.raises(RuntimeError, match="stage returned dict results for 2 records on a retry"):
        check_outputs({}, 2, " on a retry")


class DiskFullOnce(FakeRemoteHost):
    """Answers a record's first call with the slot a Ray actor sends for a prepare that hit a full disk."""

    def __init__(self):
        super().__init__()
        self.full: set[str] = set()

    async def process(self, batch):
        answers = await super().process(batch)
        for n, record in enumerate(batch):
            if record["id"].startswith("full") and record["id"] not in self.full:
                self.full.add(record["id"])
                answers[n] = StageError.from_exception(OSError(errno.ENOSPC, "No space left on device"))
        return answers


async def test_the_worker_waits_out_a_full_disk_reported_in_a_slot():
    host = DiskFullOnce()
    ok, failed = await run_worker(host, ["a", "full1", "b"], batch_size=3, concurrency=1)
    assert failed == []
    assert sorted(ok) == ["a", "b", "full1"]
    assert host.calls == [["a", "full1", "b"], ["full1"]]  # asked again for that record alone
