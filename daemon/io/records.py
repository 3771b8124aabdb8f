"""Records as they travel through the pipeline, and a compact set of the ids a job has seen."""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Record:
    """One input row on its way through the steps.

    `row` is the input as read (it is what the result line repeats); `fields` is what stages
    see (paths resolved, earlier outputs merged); `outputs` collects what the steps added.
    `key` identifies the record in the resume ledger (its id, or a row-based key for rows
    that have no usable id). `step_digests` maps each step it went through to the digest of
    the config that step's worker ran with (hot reload can change it between steps).
    """

    id: str | None
    job: str
    row_number: int
    row: dict[str, Any]
    fields: dict[str, Any]
    key: str
    outputs: dict[str, Any] = field(default_factory=dict)
    step_digests: dict[str, str | None] = field(default_factory=dict)
    # What the last step decided besides new fields (DESIGN.md, "Fan-out and filters"):
    filtered: Any = None  # a stages.base.Filtered: the record ends in the job's filtered file
    children: list[dict[str, Any]] | None = None  # the record fans out into these (each a dict of new fields)

    def child(self, k: int, own: dict[str, Any]) -> Record:
        """The k-th child of this record: id `<id>:<k:04d>`, the parent's fields plus its own."""
        child_id = f"{self.id}:{k:04d}"
        fields = {**self.fields, **own, "id": child_id}
        return Record(
            id=child_id,
            job=self.job,
            row_number=self.row_number,
            row=self.row,
            fields=fields,
            key=child_id,
            outputs={**self.outputs, **own},
            step_digests=dict(self.step_digests),
        )

    def merge(self, output: dict[str, Any]) -> None:
        self.outputs.update(output)
        self.fields.update(output)


def duplicate_key(record_id: str, row_number: int) -> str:
    return f"{record_id}\x00dup@{row_number}"


def unreadable_row_key(row_number: int) -> str:
    return f"\x00row@{row_number}"


class IdSet:
    """A set of strings kept as 64-bit hashes in an open-addressing table.

    A Python set of a million id strings costs ~100 MB; this costs 8 bytes a slot and, the
    table being at most half full, at most 16 bytes an id (8 MB per half-million ids). A false "seen" needs a 64-bit collision:
    about 1 in 10^7 for a million ids.

    Past `memory_ids` ids the hashes move to a SQLite table in a temporary file (deleted on
    close, read through its bounded page cache, never mapped), so memory stops growing with
    the file: a 10M-row job holds the table's 8 MiB plus SQLite's cache. Same hashes, same
    answers: only where they live changes.
    """

    _EMPTY = np.uint64(0)
    MEMORY_IDS = 1 << 19  # 1 M slots = 8 MiB at most half full; then spill to disk
    _CACHE_KIB = 8192  # SQLite page cache per spilled set

    def __init__(self, capacity: int = 1024, memory_ids: int | None = None, spill_dir: str | None = None):
        self.memory_ids = memory_ids or self.MEMORY_IDS
        self.spill_dir = spill_dir
        size = 1 << max(10, (min(capacity, self.memory_ids) * 2 - 1).bit_length())
        self._slots = np.zeros(size, dtype=np.uint64)
        self._count = 0
        self._disk: sqlite3.Connection | None = None

    @staticmethod
    def _hash(text: str) -> int:
        value = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        return value or 1  # 0 marks an empty slot

    def __len__(self) -> int:
        return self._count

    def _find(self, value: int) -> tuple[int, bool]:
        slots, mask = self._slots, len(self._slots) - 1
        index = value & mask
        while True:
            current = int(slots[index])
            if current == 0:
                return index, False
            if current == value:
                return index, True
            index = (index + 1) & mask

    def __contains__(self, text: str) -> bool:
        value = self._hash(text)
        if self._disk is not None:
            return self._disk.execute("SELECT 1 FROM ids WHERE h = ?", (_signed(value),)).fetchone() is not None
        return self._find(value)[1]

    def add(self, text: str) -> bool:
        """Add; return False if it was already there."""
        value = self._hash(text)
        if self._disk is not None:
            added = self._disk.execute("INSERT OR IGNORE INTO ids VALUES (?)", (_signed(value),)).rowcount == 1
            self._count += added
            return added
        index, found = self._find(value)
        if found:
            return False
        self._slots[index] = value
        self._count += 1
        if self._count > self.memory_ids:
            self._spill()
        elif self._count * 2 > len(self._slots):
            self._grow()
        return True

    def _spill(self) -> None:
        """Move every hash to an on-disk table; the in-memory one is freed."""
        # noqa below: the file must outlive this call (it lives as long as the set), so no `with`.
        handle = tempfile.NamedTemporaryFile(prefix="reelflow-ids-", suffix=".sqlite", dir=self.spill_dir)  # noqa: SIM115
        # isolation_level=None + one open transaction: no journal fsync per id (the set is rebuilt
        # from the results file on resume, so it need not survive a crash).
        disk = sqlite3.connect(handle.name, isolation_level=None, check_same_thread=False)
        disk.execute("PRAGMA journal_mode=OFF")
        disk.execute("PRAGMA synchronous=OFF")
        disk.execute(f"PRAGMA cache_size=-{self._CACHE_KIB}")
        disk.execute("CREATE TABLE ids (h INTEGER PRIMARY KEY) WITHOUT ROWID")
        disk.execute("BEGIN")
        used = self._slots[self._slots != 0]
        for start in range(0, len(used), 1 << 16):  # in slices, as in _grow
            disk.executemany(
                "INSERT INTO ids VALUES (?)", ((_signed(v),) for v in used[start : start + (1 << 16)].tolist())
            )
        self._handle, self._disk = handle, disk  # the file lives as long as the handle
        self._slots = np.zeros(1, dtype=np.uint64)

    def _grow(self) -> None:
        old = self._slots[self._slots != 0]
        self._slots = np.zeros(len(self._slots) * 2, dtype=np.uint64)
        for start in range(0, len(old), 1 << 16):  # in slices: a Python list of every hash costs ~36 B each
            for value in old[start : start + (1 << 16)].tolist():
                index, _ = self._find(value)
                self._slots[index] = value


def _signed(value: int) -> int:
    """A 64-bit hash as SQLite's signed INTEGER."""
    return value - (1 << 64) if value >= 1 << 63 else value
