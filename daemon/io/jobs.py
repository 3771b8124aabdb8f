"""Job names, fingerprints and the ledger that remembers which inbox files were processed.

A job is one inbox file. Its name is the file's stem; the same content dropped again
(same size and SHA-256) is the same job; different content under a used name becomes
`<stem>-2`, `<stem>-3`, ... (a stem ending in `.errors` becomes `<x>_errors`, so that it
cannot share job `<x>`'s errors file). The ledger is one small JSON file per job under
`<outbox>/.reelflow/jobs/`, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

WORK, DONE, FAILED = ".work", ".done", ".failed"
ERRORS_SUFFIX = ".errors"


def fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return f"{path.stat().st_size}:{digest.hexdigest()}"


@dataclass
class JobEntry:
    name: str
    source: str  # the file name as dropped
    suffix: str
    fingerprint: str
    state: str  # claimed | done | failed
    claimed_at: float
    finished_at: float | None = None
    ok: int = 0
    errors: int = 0


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class JobLedger:
    def __init__(self, state_dir: Path):
        self.folder = state_dir / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, JobEntry] = {}
        self.by_fingerprint: dict[str, str] = {}
        for path in self.folder.glob("*.json"):
            try:
                entry = JobEntry(**json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                continue
            self._remember(entry)

    def _remember(self, entry: JobEntry) -> None:
        self.entries[entry.name] = entry
        self.by_fingerprint[entry.fingerprint] = entry.name

    def save(self, entry: JobEntry) -> None:
        write_json_atomic(self.folder / f"{entry.name}.json", asdict(entry))
        self._remember(entry)

    def known(self, print_: str) -> JobEntry | None:
        name = self.by_fingerprint.get(print_)
        return self.entries.get(name) if name else None

    def new_name(self, stem: str, taken_in_work: set[str]) -> str:
        if stem.endswith(ERRORS_SUFFIX):  # job X writes X.errors.jsonl: a job named X.errors would share it
            stem = stem.removesuffix(ERRORS_SUFFIX) + "_errors"
        name, n = stem, 1
        while name in self.entries or name in taken_in_work:
            n += 1
            name = f"{stem}-{n}"
        return name


def unique_destination(folder: Path, file_name: str) -> Path:
    """`folder/file_name`, or `stem.1.ext`, `stem.2.ext`, ... if that exists."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name
    n = 0
    while os.path.lexists(target):  # lexists: a dangling link there (a refused inbox link) is taken too
        n += 1
        target = folder / f"{Path(file_name).stem}.{n}{Path(file_name).suffix}"
    return target


def record_failure(inbox: Path, path: Path, message: str) -> Path:
    """Move an unreadable file to inbox/.failed/ with `<name>.error.json` beside it."""
    target = unique_destination(inbox / FAILED, path.name)
    os.replace(path, target)
    write_json_atomic(
        target.with_name(target.name + ".error.json"), {"file": path.name, "error": message, "at": time.time()}
    )
    return target
