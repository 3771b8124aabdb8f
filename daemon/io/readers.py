"""Stream rows out of meta files and raw videos, one at a time, never a whole file in memory.

Each reader yields `(row_number, row)` where `row` is a dict or a `RowProblem` saying what
was wrong with that row; the file goes on after a bad row. A problem with the file as a
whole (unreadable, not the declared format at all) raises `UnreadableFile`.

Row numbers: jsonl counts lines (so an editor finds them), csv/tsv count data rows after
the header, json counts array elements, parquet counts rows; all 1-based.
"""

from __future__ import annotations

import csv
import json
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
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            line = raw.strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield (
                    line_number,
                    RowProblem(
                        f"{name}: line {line_number} is not valid JSON ({exc}); expected one JSON object per line",
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
            yield line_number, value


def _read_json_array(path: Path, name: str, chunk_chars: int = 1 << 16) -> Iterator[tuple[int, Any]]:
    """Stream the elements of a top-level JSON array without loading the file."""
    decoder = json.JSONDecoder()
    with path.open("r", encoding="utf-8-sig") as handle:
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
                    yield (
                        element,
                        RowProblem(
                            f"{name}: array element {element} is not valid JSON ({exc.msg}); the rest of the file cannot be read",
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


def _read_delimited(path: Path, name: str, delimiter: str) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                return
            header = [column.strip() for column in header]
            for row_number, values in enumerate(reader, start=1):
                if not values or (len(values) == 1 and not values[0].strip()):
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
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"{name}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise UnreadableFile(f"{name}: malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {exc}") from None


def _read_parquet(path: Path, name: str, batch_rows: int = 1024) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UnreadableFile(f"{name}: not a readable Parquet file ({exc})") from None
    row_number = 0
    for group in range(parquet.num_row_groups):
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group]):
            for row in batch.to_pylist():
                row_number += 1
                yield row_number, row
