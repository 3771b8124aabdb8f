"""Stream rows out of meta files and raw videos, one at a time, never a whole file in memory.

Each reader yields `(row_number, row)` where `row` is a dict or a `RowProblem` saying what
was wrong with that row; the file goes on after a bad row. A problem with the file as a
whole (unreadable, not the declared format at all) raises `UnreadableFile`.

A row that cannot be parsed for any reason of its own (invalid JSON, an integer beyond 64
bits, nesting too deep for the parser, bytes that are not UTF-8) is a `RowProblem` naming the
file, the row and what was expected; only that row is lost.

Row numbers: jsonl counts lines (so an editor finds them), csv/tsv count data rows after
the header, json counts array elements, parquet counts rows; all 1-based.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

META_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"}
)


@dataclass(frozen=True)
class RowProblem:
    message: str
    error_type: str = "BadRow"


class UnreadableFile(Exception):
    pass


def open_regular(path: Path, name: str) -> io.BufferedReader:
    """Open a claimed meta file for reading, refusing anything but a regular file.

    The inbox takes only regular files, but between its last look and the claim (a rename) the
    entry can be swapped for a link to, say, /etc/passwd: O_NOFOLLOW refuses a link at the open
    itself, and O_NONBLOCK keeps a FIFO swapped in from blocking the open forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        if os.path.islink(path):
            raise UnreadableFile(
                f"{name}: is a symbolic link (to {os.readlink(path)}); meta files must be regular files, never "
                "links: copy or move the file itself into the inbox"
            ) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnreadableFile(f"{name}: is not a regular file (a folder, FIFO, socket or device); drop a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what the results writer (orjson) can write back
_BOM = b"\xef\xbb\xbf"


def _parse_int(text: str) -> int:
    """json's int hook: refuse integers the results file could not repeat (and huge ones
    before Python's own 4300-digit guard, whose message names no limit a user can act on)."""
    digits = len(text) - text.startswith("-")
    if digits > 20 or not INT_MIN <= (value := int(text)) <= INT_MAX:
        raise ValueError(
            f"an integer with {digits} digits ({text[:12]}...); expected one that fits in 64 bits "
            "(-2**63 .. 2**64-1): write bigger numbers as strings"
        )
    return value


_DECODER = json.JSONDecoder(parse_int=_parse_int)  # one for all rows: json.loads(parse_int=) builds one a call
MAX_DEPTH = 200  # nesting the results writer (orjson: 254 levels) can still wrap in a result or error line


def _too_deep(line: bytes, value: Any) -> bool:
    """Whether `value` nests deeper than MAX_DEPTH; only walked when the line has that many brackets."""
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _parse_error(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply for the JSON parser (RecursionError)"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 ({exc})"
    return str(exc)


def input_format(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in META_FORMATS:
        return META_FORMATS[suffix]
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def read_rows(path: Path, fmt: str, video_key: str, display_name: str | None = None) -> Iterator[tuple[int, Any]]:
    name = display_name or path.name
    readers = {
        "jsonl": _read_jsonl,
        "json": _read_json_array,
        "csv": lambda p, n: _read_delimited(p, n, ","),
        "tsv": lambda p, n: _read_delimited(p, n, "\t"),
        "parquet": _read_parquet,
    }
    if fmt == "video":
        yield 1, {video_key: display_name or path.name}
        return
    try:
        yield from readers[fmt](path, name)
    except OSError as exc:
        raise UnreadableFile(f"{name}: cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # e.g. a JSON array whose bad bytes sit past the first chunk
        raise UnreadableFile(f"{name}: not UTF-8 text ({exc})") from None


def _read_jsonl(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    with open_regular(path, name) as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            line = raw.strip()
            if not line:
                continue
            try:
                value = _DECODER.decode(line.decode("utf-8"))
            except (ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError, UnicodeDecodeError
                yield (
                    line_number,
                    RowProblem(
                        f"{name}: line {line_number} is not valid JSON ({_parse_error(exc)}); expected one JSON object per line",
                        "BadJson",
                    ),
                )
                continue
            if not isinstance(value, dict):
                yield (
                    line_number,
                    RowProblem(
                        f"{name}: line {line_number} is a JSON {type(value).__name__}; expected a JSON object",
                        "NotAnObject",
                    ),
                )
                continue
            if _too_deep(line, value):
                yield (
                    line_number,
                    RowProblem(
                        f"{name}: line {line_number} nests objects or arrays more than {MAX_DEPTH} levels deep; "
                        f"expected at most {MAX_DEPTH} (results are written back as JSON)",
                        "TooDeep",
                    ),
                )
                continue
            yield line_number, value


def _read_json_array(path: Path, name: str, chunk_chars: int = 1 << 16) -> Iterator[tuple[int, Any]]:
    """Stream the elements of a top-level JSON array without loading the file."""
    decoder = json.JSONDecoder(parse_int=_parse_int)
    with io.TextIOWrapper(open_regular(path, name), encoding="utf-8-sig") as handle:
        buffer, position, eof = "", 0, False

        def fill() -> bool:
            nonlocal buffer, position, eof
            chunk = handle.read(chunk_chars)
            if not chunk:
                eof = True
                return False
            buffer = buffer[position:] + chunk
            position = 0
            return True

        def skip_space() -> str | None:
            nonlocal position
            while True:
                while position < len(buffer) and buffer[position] in " \t\r\n":
                    position += 1
                if position < len(buffer):
                    return buffer[position]
                if not fill():
                    return None

        try:
            first = skip_space()
        except UnicodeDecodeError as exc:
            raise UnreadableFile(f"{name}: not UTF-8 text ({exc})") from None
        if first != "[":
            raise UnreadableFile(
                f"{name}: expected a JSON array of objects ([{{...}}, ...]), found {first!r} at the start"
            )
        position += 1
        element = 0
        while True:
            nxt = skip_space()
            if nxt == "]":
                return
            if nxt is None:
                raise UnreadableFile(f"{name}: the JSON array ends early after element {element} (truncated file?)")
            if element and nxt == ",":
                position += 1
                skip_space()
            element += 1
            while True:
                try:
                    value, end = decoder.raw_decode(buffer, position)
                    break
                except json.JSONDecodeError as exc:
                    if not eof and fill():
                        continue
                    problem = exc.msg
                except (ValueError, RecursionError) as exc:  # a huge integer, deep nesting: the end is unknown
                    problem = _parse_error(exc)
                yield (
                    element,
                    RowProblem(
                        f"{name}: array element {element} is not valid JSON ({problem}); the rest of the file cannot be read",
                        "BadJson",
                    ),
                )
                return
            position = end
            if isinstance(value, dict):
                yield element, value
            else:
                yield (
                    element,
                    RowProblem(
                        f"{name}: array element {element} is a JSON {type(value).__name__}; expected an object",
                        "NotAnObject",
                    ),
                )


class _DecodedLines:
    """A byte file's physical lines, each decoded on its own, for csv.reader.

    A line that is not UTF-8 is passed on with U+FFFD in place of its bad bytes and its number
    noted in `bad`: the row it belongs to becomes a RowProblem, and the rows after it are read
    as usual (decoding the whole file as one text stream would stop at the first bad byte).
    """

    def __init__(self, handle):
        self.handle = handle
        self.line = 0
        self.bad: list[tuple[int, UnicodeDecodeError]] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.handle.readline()
        if not raw:
            raise StopIteration
        self.line += 1
        if self.line == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.bad.append((self.line, exc))
            return raw.decode("utf-8", "replace")


def _read_delimited(path: Path, name: str, delimiter: str) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    kind = "TSV" if delimiter == "\t" else "CSV"
    with open_regular(path, name) as handle:
        lines = _DecodedLines(handle)
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise UnreadableFile(f"{name}: malformed {kind} header: {exc}") from None
        if not header:
            return
        if lines.bad:
            line, exc = lines.bad[0]
            raise UnreadableFile(f"{name}: the header (line {line}) is not UTF-8 text ({exc}); save the file as UTF-8")
        header = [column.strip() for column in header]
        row_number = 0
        while True:
            first_line = lines.line + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # the reader resets and goes on with the next line
                row_number += 1
                lines.bad.clear()
                yield (
                    row_number,
                    RowProblem(f"{name}: row {row_number} (line {first_line}) is malformed {kind}: {exc}", "BadRow"),
                )
                continue
            row_number += 1  # blank rows count too, as they always have: resume keys use these numbers
            if not values or (len(values) == 1 and not values[0].strip()):
                lines.bad.clear()
                continue
            if lines.bad:
                line, exc = lines.bad[0]
                lines.bad.clear()
                yield (
                    row_number,
                    RowProblem(
                        f"{name}: row {row_number} (line {line}) is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "expected UTF-8: save the file as UTF-8",
                        "BadEncoding",
                    ),
                )
                continue
            if len(values) != len(header):
                yield (
                    row_number,
                    RowProblem(
                        f"{name}: row {row_number} (line {reader.line_num}) has {len(values)} fields; expected {len(header)} like the header {header}",
                        "BadRow",
                    ),
                )
                continue
            yield row_number, dict(zip(header, values, strict=True))


def _read_parquet(path: Path, name: str, batch_rows: int = 1024) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_regular(path, name) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UnreadableFile(f"{name}: not a readable Parquet file ({exc})") from None
        row_number = 0
        for group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group]):
                for row in batch.to_pylist():
                    row_number += 1
                    yield row_number, row
