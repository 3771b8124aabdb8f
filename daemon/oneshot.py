"""`reelflow run` (and `python run_pipeline.py`): one file through the same engine, then exit.

`meta_path` in; per-step intermediate results and the working results file under
`base_folder`; the final results in `save_folder` in the input's own format (csv in, csv
out), errors beside them as `<job>.errors.jsonl`, generated media in `save_folder/media/`.
Running it again resumes: records already written are skipped.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson

from daemon.config import Config, ConfigError
from daemon.io.outbox import OutboxLayout
from daemon.io.readers import META_FORMATS, input_format
from daemon.metrics import Metrics
from daemon.runtime.engine import Engine, FileUnreadable, JobInput
from daemon.runtime.failures import JobFailed, PipelineDied

log = logging.getLogger("reelflow")

PARQUET_ROWS = 65536  # rows per row group when writing parquet results

EXTENSIONS = {
    "jsonl": ".jsonl",
    "json": ".json",
    "csv": ".csv",
    "tsv": ".tsv",
    "parquet": ".parquet",
    "video": ".jsonl",
}


@dataclass
class Summary:
    ok: int
    errors: int
    skipped: int
    results: Path
    errors_file: Path
    filtered: int = 0
    filtered_file: Path | None = None


def _missing_meta_hint(meta_path: Path) -> str:
    """Where a missing meta file was looked for, and how to get the README's sample inputs."""
    where = (
        ""
        if meta_path.is_absolute()
        else f" (looked for {Path.cwd() / meta_path}: a relative path is read from the folder reelflow runs in)"
    )
    if not meta_path.is_absolute() and meta_path.parts[:1] == ("demo",):
        return f"{where}; the sample inputs are made by `python -m tests.media demo`, run from the repository root"
    return f"{where}; point meta_path at an existing meta file or video"


def run_targets(config: Config) -> tuple[Path, Path, Path, str]:
    """(meta_path, save folder, final results file, format), or a ConfigError."""
    file = config.file
    problems = []
    if file.meta_path is None:
        problems.append("meta_path: required for `reelflow run` (the file to process)")
    elif not file.meta_path.is_file():
        problems.append(f"meta_path: no such file: {file.meta_path}{_missing_meta_hint(file.meta_path)}")
    elif input_format(file.meta_path) is None:
        problems.append(
            f"meta_path: {file.meta_path.name}: unsupported type; expected one of {sorted(META_FORMATS)} or a video file"
        )
    if file.save_folder is None:
        problems.append("save_folder: required for `reelflow run` (where the final results go)")
    if problems:
        raise ConfigError(str(config.source or "<config>"), problems)
    fmt = input_format(file.meta_path)
    save = file.save_folder
    if save.suffix.lower() in META_FORMATS:  # the seed passed a file path here
        return file.meta_path, save.parent, save, fmt
    return file.meta_path, save, save / f"{file.meta_path.stem}{EXTENSIONS[fmt]}", fmt


async def run_once(config: Config, progress: bool = True) -> Summary:
    meta_path, save_folder, final, fmt = run_targets(config)
    base_folder = config.file.base_folder or save_folder / "intermediate"
    base_folder.mkdir(parents=True, exist_ok=True)
    save_folder.mkdir(parents=True, exist_ok=True)
    layout = OutboxLayout.one_shot(base_folder.resolve(), save_folder.resolve())
    for key, path in (("save_folder", final), ("base_folder", layout.for_job(meta_path.stem).results)):
        if path.resolve() == meta_path.resolve():
            raise ConfigError(
                str(config.source or "<config>"),
                [f"{key}: the results would be written to {path}, which is meta_path itself; choose another {key}"],
            )
    engine = Engine(config, layout, Metrics(), tag_results=True)  # _config_hash, as the daemon writes it
    await engine.start()
    job = JobInput(meta_path.stem, meta_path.resolve(), fmt, meta_path.name, meta_path.parent)
    try:
        run_task = asyncio.create_task(engine.run_job(job))
        # Counting the rows reads the whole file: in a thread, so the workers keep the loop meanwhile.
        total = await asyncio.to_thread(row_total, meta_path, fmt) if progress else None
        await _show_progress(engine, job.name, run_task, progress, total)
        run = await run_task
    finally:
        await engine.stop()
    paths = layout.for_job(job.name)
    export_results(paths.results, fmt, final)
    return Summary(run.ok, run.errors, run.skipped, final, paths.errors, run.filtered, paths.filtered)


def row_total(path: Path, fmt: str) -> int | None:
    """How many rows the input holds, where that is cheap: a newline count, or parquet's metadata.

    An upper bound for jsonl/csv (blank lines, quoted newlines); None for json, which would need
    a parse. Only the progress bar uses it.
    """
    if fmt == "video":
        return 1
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt not in ("jsonl", "csv", "tsv"):
        return None
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    lines += last != b"\n"  # a last line without its newline
    return max(lines - (fmt != "jsonl"), 0)  # csv/tsv: the header


def bar_total(run, rows: int | None) -> int | None:
    """The records this run will end, as far as known: a row that fans out ends as its children,
    so the input's row count alone would be overrun. Everything still on its way is
    `outstanding` (children join it when their parent's expansion is recorded), so `ended +
    outstanding` is a floor that grows with each expansion, and the exact count once the file
    has been read; until then the row count (an upper bound of the rows) keeps the bar honest."""
    known = run.ok + run.errors + run.filtered + run.outstanding
    if run.reading_done or rows is None:
        return known if run.reading_done else None
    return max(rows, known)


async def _show_progress(engine: Engine, job: str, task: asyncio.Task, enabled: bool, total: int | None = None) -> None:
    from tqdm import tqdm

    bar = tqdm(desc=job, unit="rec", total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
    run = None

    def show() -> None:
        bar.total = bar_total(run, total)
        bar.n = run.ok + run.errors + run.filtered
        bar.set_postfix(ok=run.ok, errors=run.errors, filtered=run.filtered, refresh=False)
        bar.refresh()

    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            run = engine.pipeline.jobs.get(job) or run
            if run is not None:
                show()
        if not task.cancelled() and task.exception() is None:
            run = task.result()  # the final counts: the loop's last look may predate them
            show()
    finally:
        bar.close()


def _rows(path: Path):
    if not path.exists():
        return
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield orjson.loads(line)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def export_results(results: Path, fmt: str, target: Path) -> None:
    """Write the results (jsonl) in the input's format, streaming where the format allows."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    if fmt in ("jsonl", "video"):
        with tmp.open("wb") as out:
            for row in _rows(results):
                out.write(orjson.dumps(row) + b"\n")
    elif fmt == "json":
        with tmp.open("wb") as out:
            out.write(b"[")
            for n, row in enumerate(_rows(results)):
                out.write((b",\n" if n else b"\n") + orjson.dumps(row))
            out.write(b"\n]\n")
    elif fmt in ("csv", "tsv"):
        columns: dict[str, None] = {}
        for row in _rows(results):
            columns.update(dict.fromkeys(row))
        with tmp.open("w", encoding="utf-8", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(columns), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            for row in _rows(results):
                writer.writerow({k: _cell(v) for k, v in row.items()})
    elif fmt == "parquet":
        _export_parquet(results, tmp)
    tmp.replace(target)


def _chunks(results: Path, size: int | None = None):
    size = size or PARQUET_ROWS
    chunk = []
    for row in _rows(results):
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _export_parquet(results: Path, target: Path) -> None:
    """Two streaming passes, one row group per chunk: the schema of every chunk, unified; then the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # from_pylist alone takes the columns of the first row only: rows with more keys would lose them.
    schemas = [
        pa.Table.from_pydict(
            {key: [row.get(key) for row in chunk] for key in dict.fromkeys(k for r in chunk for k in r)}
        ).schema
        for chunk in _chunks(results)
    ]
    if not schemas:
        pq.write_table(pa.table({}), target)
        return
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    with pq.ParquetWriter(target, schema) as writer:
        for chunk in _chunks(results):
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))


def main(config: Config, progress: bool = True) -> int:
    try:
        summary = asyncio.run(run_once(config, progress))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (FileUnreadable, JobFailed, PipelineDied) as exc:  # the message names the file and the cause
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"done: {summary.ok} ok, {summary.errors} errors, {summary.filtered} filtered, "
        f"{summary.skipped} skipped (already written by an earlier run)"
    )
    print(f"results: {summary.results.resolve()}")
    if summary.errors or summary.errors_file.exists():
        print(f"errors:  {summary.errors_file.resolve()}")
    if summary.filtered_file is not None and (summary.filtered or summary.filtered_file.exists()):
        print(f"filtered: {summary.filtered_file.resolve()}")
    return 0
