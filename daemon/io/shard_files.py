"""What one shard holds and how its file is written: WebDataset sample keys, the `bucket_by`
rules, and the tar being filled (streamed into its `.tmp` file, sealed like tarfile seals it).
The exactly-once bookkeeping around them is daemon/io/sinks.py's."""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from pathlib import Path

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_:-]")  # webdataset splits keys from extensions at the first dot


def sample_key(record_id: str) -> str:
    """A WebDataset key for an id: readable, no dots or slashes, never the same for two ids."""
    safe = _KEY_UNSAFE.sub("_", record_id)[:120] or "_"
    if safe == record_id:
        return safe
    return f"{safe}-{hashlib.sha1(record_id.encode()).hexdigest()[:10]}"


def resolution_bucket(line: dict) -> str:
    probe = line.get("probe") if isinstance(line.get("probe"), dict) else {}
    width, height = probe.get("width"), probe.get("height")
    if not width or not height:
        return "unknown-res"
    short = min(int(width), int(height))
    for limit, name in ((360, "360p"), (480, "480p"), (720, "720p"), (1080, "1080p")):
        if short <= limit:
            return name
    return "2160p"


def duration_bucket(line: dict) -> str:
    clip = line.get("clip") if isinstance(line.get("clip"), dict) else None
    probe = line.get("probe") if isinstance(line.get("probe"), dict) else {}
    if clip and clip.get("end_s") is not None and clip.get("start_s") is not None:
        seconds = float(clip["end_s"]) - float(clip["start_s"])
    elif probe.get("duration_s"):
        seconds = float(probe["duration_s"])
    else:
        return "unknown-len"
    for limit, name in ((5, "0-5s"), (10, "5-10s"), (30, "10-30s")):
        if seconds < limit:
            return name
    return "30s-plus"


BUCKETS = {"resolution": resolution_bucket, "duration": duration_bucket}


_BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(tarfile.RECORDSIZE)


class OpenShard:
    """The shard being filled for one bucket. A tar is streamed into its `.tmp` file as samples
    come (the kernel writes it back meanwhile, so the fsync at the end is short); Parquet rows
    are kept until the file is written whole."""

    def __init__(self, bucket: str, index: int, final: Path, streamed: bool):
        self.bucket = bucket
        self.index = index
        self.final = final
        self.temporary = final.with_name(final.name + ".tmp")
        self.ids: list[str] = []
        self.lines: list[dict] = []
        self.bytes = 0
        self._fd: int | None = None
        self._written = 0  # bytes of the tar so far
        if streamed:
            final.parent.mkdir(parents=True, exist_ok=True)
            # Open until the shard is sealed (or abandoned), across many calls.
            self._fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def add_members(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """One sample's files as USTAR members, in one writev: tarfile.addfile copies each
        TarInfo and pushes the data through a 16 kB copy loop, which cost more than the
        exactly-once bookkeeping (bench/shards.py)."""
        parts: list[bytes] = []
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mode = 0o644
            parts += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), data]
            if len(data) % _BLOCK:
                parts.append(_ZEROS[: _BLOCK - len(data) % _BLOCK])
            self.bytes += len(data)
        self._write(parts)

    def _write(self, parts: list[bytes]) -> None:
        total = sum(map(len, parts))
        done = os.writev(self._fd, parts)
        if done < total:  # a short write (a signal, a nearly full disk): write the rest plainly
            rest = b"".join(parts)[done:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]
        self._written += total

    def abandon(self) -> None:
        """The job stopped before this shard was full: leave the `.tmp` for the restart to discard."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def seal_tar(self) -> None:
        # The end of the archive as tarfile writes it: two zero blocks, padded to a whole record.
        end = self._written + 2 * _BLOCK
        self._write([_ZEROS[: 2 * _BLOCK + (-end) % tarfile.RECORDSIZE]])
        os.fsync(self._fd)
        self.abandon()
