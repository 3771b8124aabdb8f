"""Records as they travel through the pipeline, and a compact set of the ids a job has seen."""

from __future__ import annotations

import hashlib
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
    """

    _EMPTY = np.uint64(0)

    def __init__(self, capacity: int = 1024):
        size = 1 << max(10, (capacity * 2 - 1).bit_length())
        self._slots = np.zeros(size, dtype=np.uint64)
        self._count = 0

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
        return self._find(self._hash(text))[1]

    def add(self, text: str) -> bool:
        """Add; return False if it was already there."""
        value = self._hash(text)
        index, found = self._find(value)
        if found:
            return False
        self._slots[index] = value
        self._count += 1
        if self._count * 2 > len(self._slots):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._slots[self._slots != 0]
        self._slots = np.zeros(len(self._slots) * 2, dtype=np.uint64)
        for start in range(0, len(old), 1 << 16):  # in slices: a Python list of every hash costs ~36 B each
            for value in old[start : start + (1 << 16)].tolist():
                index, _ = self._find(value)
                self._slots[index] = value
