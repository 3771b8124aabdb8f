"""Job names, fingerprints and the ledger that remembers which inbox files were processed.

A job is one inbox file. Its name is the file's stem; the same content dropped again
(same size and SHA-256) is the same job; different content under a used name becomes
`<stem>-2`, `<stem>-3`, ... (a stem ending in `.errors` becomes `<x>_errors`, so that it
cannot share job `<x>`'s errors file). The ledger is one small JSON file per job under
`<outbox>/.reelflow/jobs/`, written atomically, plus an index from fingerprint to job name
under `jobs/.prints/`. Nothing per job is kept in memory: lookups read those files, so a
daemon that has finished 100,000 jobs holds no more than one that has finished none.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
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
    """The jobs this outbox has seen, on disk only.

    With `inbox`, start-up also settles what a crash left half-recorded: a job still
    `claimed` in the ledger whose file already sits in `inbox/.done/` (killed between the
    move and the ledger write) becomes `done`, with its counts taken from its outbox files.
    """

    def __init__(self, state_dir: Path, inbox: Path | None = None):
        self.folder = state_dir / "jobs"
        self.prints = self.folder / ".prints"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.outbox = state_dir.parent
        indexed = self.prints.is_dir()
        self.prints.mkdir(exist_ok=True)
        claimed = []
        for entry in self._all():  # one pass, nothing kept but the (few) claimed entries
            if not indexed:  # a ledger from before the index: build it once
                self._index(entry)
            if entry.state == "claimed":
                claimed.append(entry)
        if inbox is not None:
            for entry in claimed:
                self._settle_if_done(entry, inbox)

    def _all(self) -> Iterator[JobEntry]:
        for path in self.folder.glob("*.json"):
            entry = self._read(path)
            if entry is not None:
                yield entry

    @staticmethod
    def _read(path: Path) -> JobEntry | None:
        try:
            return JobEntry(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def _print_path(self, print_: str) -> Path:
        return self.prints / print_.replace(":", "-")  # "<size>:<sha256>": already a safe name otherwise

    def _index(self, entry: JobEntry) -> None:
        path = self._print_path(entry.fingerprint)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(entry.name, encoding="utf-8")
        os.replace(tmp, path)

    def get(self, name: str) -> JobEntry | None:
        return self._read(self.folder / f"{name}.json")

    @property
    def entries(self) -> Mapping[str, JobEntry]:
        """`entries[name]` / `entries.get(name)`, read from disk on each access."""
        return _Entries(self)

    def save(self, entry: JobEntry) -> None:
        # The index first: a crash between the two leaves an index naming a job with no entry,
        # which reads as unknown (the file is processed as new), never an entry nothing finds.
        self._index(entry)
        write_json_atomic(self.folder / f"{entry.name}.json", asdict(entry))

    def known(self, print_: str) -> JobEntry | None:
        try:
            name = self._print_path(print_).read_text(encoding="utf-8")
        except OSError:
            return None
        entry = self.get(name)
        return entry if entry is not None and entry.fingerprint == print_ else None

    def new_name(self, stem: str, taken_in_work: set[str]) -> str:
        if stem.endswith(ERRORS_SUFFIX):  # job X writes X.errors.jsonl: a job named X.errors would share it
            stem = stem.removesuffix(ERRORS_SUFFIX) + "_errors"
        name, n = stem, 1
        while (self.folder / f"{name}.json").exists() or name in taken_in_work:
            n += 1
            name = f"{stem}-{n}"
        return name

    def claim(self, path: Path, inbox: Path, known: JobEntry | None) -> tuple[str, Path]:
        """Move an inbox file into `inbox/.work/` under its job's name: a known job's, else a new one."""
        in_work = {p.stem for p in (inbox / WORK).iterdir()}
        name = known.name if known is not None else self.new_name(path.stem, in_work)
        claimed = inbox / WORK / f"{name}{path.suffix}"
        os.replace(path, claimed)
        return name, claimed

    def _settle_if_done(self, entry: JobEntry, inbox: Path) -> None:
        if (inbox / WORK / f"{entry.name}{entry.suffix}").exists():
            return  # still to do: serve resumes it
        source = Path(entry.source)
        done = inbox / DONE
        candidates = [done / entry.source, *done.glob(f"{glob.escape(source.stem)}.*{glob.escape(source.suffix)}")]
        size = entry.fingerprint.split(":", 1)[0]
        for candidate in candidates:
            try:
                if not candidate.is_file() or str(candidate.stat().st_size) != size:
                    continue
                if fingerprint(candidate) != entry.fingerprint:
                    continue
            except OSError:
                continue
            entry.state, entry.finished_at = "done", time.time()
            entry.ok = _count_lines(self.outbox / f"{entry.name}.jsonl")
            entry.errors = _count_lines(self.outbox / f"{entry.name}{ERRORS_SUFFIX}.jsonl")
            self.save(entry)
            return


class _Entries(Mapping):
    def __init__(self, ledger: JobLedger):
        self._ledger = ledger

    def __getitem__(self, name: str) -> JobEntry:
        entry = self._ledger.get(name)
        if entry is None:
            raise KeyError(name)
        return entry

    def __iter__(self) -> Iterator[str]:
        return (path.stem for path in self._ledger.folder.glob("*.json"))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def remove_state_file(path: Path) -> None:
    """Remove `daemon.json` if this process wrote it (a newer daemon's stays)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
    except (OSError, ValueError, AttributeError):
        pass


def unique_destination(folder: Path, file_name: str) -> Path:
    """`folder/file_name`, or `stem.1.ext`, `stem.2.ext`, ... if that exists."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name
    n = 0
    while os.path.lexists(target):  # lexists: a dangling link there (a refused inbox link) is taken too
        n += 1
        target = folder / f"{Path(file_name).stem}.{n}{Path(file_name).suffix}"
    return target


def claimed_files(inbox: Path) -> list[Path]:
    """The jobs a previous run left claimed in `inbox/.work/`, in name order."""
    return sorted(p for p in (inbox / WORK).iterdir() if p.is_file() and not p.name.startswith("."))


def move_unique(path: Path, folder: Path) -> Path:
    """Move `path` into `folder` under a name not taken there (see unique_destination)."""
    target = unique_destination(folder, path.name)
    os.replace(path, target)
    return target


def record_failure(inbox: Path, path: Path, message: str) -> Path:
    """Move an unreadable file to inbox/.failed/ with `<name>.error.json` beside it."""
    target = unique_destination(inbox / FAILED, path.name)
    os.replace(path, target)
    write_json_atomic(
        target.with_name(target.name + ".error.json"), {"file": path.name, "error": message, "at": time.time()}
    )
    return target
