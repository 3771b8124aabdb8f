"""Turn raw rows into Records: ids, duplicates, required fields, safe paths, resume skips.

Every row comes out as exactly one of: a Record to process, a Record that already failed
here (with the reason in `problem`), or nothing because a previous run already wrote it.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.io.readers import RowProblem
from daemon.io.records import IdSet, Record, duplicate_key, unreadable_row_key
from daemon.io.remote import allowing_rule, is_remote, refusal
from stages.base import JOB, MEDIA_DIR, OUTBOX_DIR, RECORD_ID, FieldKind

PATH_KINDS = ("video", "image")


@dataclass(frozen=True)
class RowRules:
    """What the first step needs from each row and where media paths may point."""

    required: dict[str, FieldKind]
    path_keys: frozenset[str]  # fields resolved to absolute paths when present
    roots: tuple[Path, ...]  # allowed folders for those paths
    base: Path  # relative paths resolve against this
    remote_allow: tuple[str, ...] = ()  # URL prefixes/globs a path field may name (daemon.remote.allow)


@dataclass
class Checked:
    record: Record
    problem: RowProblem | None = None


class RowChecker:
    def __init__(
        self, job: str, file_name: str, rules: RowRules, done: IdSet, media_dir: Path, outbox_dir: Path | None = None
    ):
        self.job = job
        self.file_name = file_name
        self.rules = rules
        self.done = done
        self.seen = IdSet()
        self.media_dir = media_dir
        self.outbox_dir = outbox_dir

    def check(self, row_number: int, row: Any) -> Checked | None:
        """None means: already written by an earlier run, skip it.

        Whatever goes wrong with one row (a path the OS refuses: NUL byte, name too long; an id
        that is not a string or number) is that row's problem; it never stops the file.
        """
        if isinstance(row, RowProblem):
            return self._unreadable(row_number, row)
        try:
            record_id = _record_id(row, row_number)
        except BadId as exc:
            return self._unreadable(row_number, RowProblem(f"{self.file_name}: row {row_number}: {exc}", "BadId"), row)
        try:
            return self._check(row_number, row, record_id)
        except Exception as exc:  # a bug's or the OS's surprise about this row's data, never the file's
            problem = RowProblem(
                f"{self.file_name}: row {row_number}: could not check the row ({type(exc).__name__}: {exc}); "
                "expected paths and fields the first step can use",
                type(exc).__name__,
            )
            return Checked(self._record(record_id, row_number, row, record_id), problem)

    def _unreadable(self, row_number: int, problem: RowProblem, row: dict | None = None) -> Checked | None:
        """A row with no usable id: its error line's id is the row number, its resume key row-based."""
        key = unreadable_row_key(row_number)
        return None if key in self.done else Checked(self._record(None, row_number, row or {}, key), problem)

    def _check(self, row_number: int, row: dict, record_id: str) -> Checked | None:
        if not self.seen.add(record_id):
            key = duplicate_key(record_id, row_number)
            if key in self.done:
                return None
            problem = RowProblem(
                f"{self.file_name}: row {row_number}: id {record_id!r} was already used by an earlier row of this file; ids must be unique within a file",
                "DuplicateId",
            )
            return Checked(self._record(record_id, row_number, row, key), problem)
        if record_id in self.done:
            return None
        record = self._record(record_id, row_number, row, record_id)
        problem = self._check_fields(row_number, record)
        return Checked(record, problem)

    def _record(self, record_id: str | None, row_number: int, row: dict, key: str) -> Record:
        fields = dict(row)
        fields[RECORD_ID] = record_id
        fields[JOB] = self.job
        fields[MEDIA_DIR] = self.media_dir
        if self.outbox_dir is not None:
            fields[OUTBOX_DIR] = self.outbox_dir
        return Record(id=record_id, job=self.job, row_number=row_number, row=row, fields=fields, key=key)

    def _check_fields(self, row_number: int, record: Record) -> RowProblem | None:
        where = f"{self.file_name}: row {row_number}"
        for key, kind in self.rules.required.items():
            value = record.row.get(key)
            if value is None or value == "":
                return RowProblem(
                    f"{where}: missing required field {key!r} ({kind}); present fields: {sorted(record.row)}",
                    "MissingField",
                )
            if not isinstance(value, str):
                return RowProblem(
                    f"{where}: field {key!r} is a {type(value).__name__}; expected a string ({kind})", "WrongType"
                )
        for key in self.rules.path_keys:
            value = record.row.get(key)
            if not isinstance(value, str) or not value:
                continue
            if is_remote(value):  # fetched before the first step (daemon/io/remote.py), if allowed
                if allowing_rule(value, list(self.rules.remote_allow)) is None:
                    return RowProblem(
                        f"{where}: field {key!r}: {refusal(value, list(self.rules.remote_allow))}", "RemoteRefused"
                    )
                continue
            try:
                resolved = self._resolve(value)
                found = resolved is not None and resolved.is_file()
            except (OSError, ValueError) as exc:  # NUL byte, name too long, ...
                return RowProblem(
                    f"{where}: field {key!r} = {_short(value)} is not a usable path ({_os_reason(exc)}); "
                    "expected the path of a file under meta_folder",
                    "BadPath",
                )
            if resolved is None:
                return RowProblem(
                    f"{where}: field {key!r} = {value!r} points outside the allowed folders {[str(r) for r in self.rules.roots]}; "
                    "media paths must stay under meta_folder (or the meta file's folder)",
                    "PathOutsideRoot",
                )
            if self.rules.required.get(key) in PATH_KINDS and not found:
                if resolved.exists():  # a folder, a FIFO (which a decoder would wait on for ever), a device
                    return RowProblem(
                        f"{where}: field {key!r}: {resolved} is {_kind_of(resolved)}, not a regular file; "
                        "expected the path of a media file",
                        "NotAFile",
                    )
                return RowProblem(f"{where}: field {key!r}: file not found: {resolved}", "FileNotFound")
            record.fields[key] = resolved
        return None

    def _resolve(self, value: str) -> Path | None:
        candidate = Path(value)
        if not candidate.is_absolute():
            candidate = self.rules.base / candidate
        resolved = candidate.resolve()
        for root in self.rules.roots:
            if resolved.is_relative_to(root):
                return resolved
        return None


class BadId(ValueError):
    pass


def _short(value: str, keep: int = 80) -> str:
    """A value for a message: long paths shortened (a 10 kB path would drown the line)."""
    return repr(value) if len(value) <= keep else f"{value[:keep]!r}... ({len(value)} characters)"


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _record_id(row: dict, row_number: int) -> str:
    value = row.get(RECORD_ID)
    if value is None or value == "":
        return str(row_number)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        shown = repr(value)
        raise BadId(
            f"field 'id' is a {type(value).__name__} ({shown[:60]}{'...' if len(shown) > 60 else ''}); "
            "expected a string or a number"
        )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _kind_of(path: Path) -> str:
    """What a path that exists but is no regular file is, in words."""
    mode = path.stat().st_mode
    for test, words in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return words
    return "a special file"
