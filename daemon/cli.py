"""Command line: `reelflow serve | run | check | steps`."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import logging
import os
import sys
import textwrap
from pathlib import Path

from daemon.allocator import limit_malloc_arenas
from daemon.config import Config, ConfigError, StepRuntime, load_config
from stages.registry import known_stages, stage_class


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change set at INFO
    # A stage's warnings (e.g. a GPU decoder falling back to the CPU) in the same log, same format.
    logging.captureWarnings(True)


# Exit codes, as the README documents them.
EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("reelflow")
RUNTIME_KEYS_ORDER = tuple(StepRuntime.model_fields)


def _load_checked(path: str, *, network: bool = True, one_shot: bool | None = False) -> Config | None:
    """The validated config, preflight passed; else the problems are printed and None returned.

    `one_shot` adds what `reelflow run` needs (meta_path, save_folder) to the same list, so a
    missing input and a missing model come in one answer; None: when the config names a meta_path.
    """
    from daemon.preflight import preflight

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
    problems = [str(problem) for problem in preflight(config, network=network)]
    if one_shot or (one_shot is None and config.file.meta_path is not None):
        from daemon.oneshot import run_targets

        try:
            run_targets(config)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        for problem in problems:  # one line each, so a wrapper's journal shows the whole cause
            print(f"{path}: {problem}", file=sys.stderr)
        return None
    return config


def _startup_failed(exc: BaseException) -> int:
    """One line naming where it failed and why; the traceback only at DEBUG."""
    log.debug("start-up failed", exc_info=exc)
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:  # a TaskGroup's: the first cause says it
        exc = exc.exceptions[0]
    where = "; ".join(getattr(exc, "__notes__", ()))
    cause = (str(exc).strip().splitlines() or [""])[0]
    print(
        f"reelflow: failed{f' in {where}' if where else ''}: {type(exc).__name__}: {cause} (--log-level DEBUG shows the traceback)",
        file=sys.stderr,
    )
    return EXIT_RUNTIME


def cmd_check(args: argparse.Namespace) -> int:
    # A one-shot config (it names a meta_path): also what `reelflow run` would refuse, now.
    config = _load_checked(args.config, network=not args.offline, one_shot=None)
    if config is None:
        return EXIT_CONFIG
    print(f"{args.config}: ok ({len(config.steps)} step(s): {', '.join(f'{s.type}/{s.name}' for s in config.steps)})")
    return 0


def _stages_by_target() -> dict[str, list[str]]:
    """Each stage class once, with every `Type/Name` it is registered under (aliases after the first)."""
    grouped: dict[str, list[str]] = {}
    for (step_type, name), target in sorted(known_stages().items()):
        grouped.setdefault(target, []).append(f"{step_type}/{name}")
    return grouped


def _fields(label: str):
    step_type, _, name = label.partition("/")
    return stage_class(step_type, name).Config.model_fields


def _default(field) -> str:
    return "required" if field.is_required() else repr(field.get_default(call_default_factory=True))


def _aliases(labels: list[str]) -> str:
    """The other names of one stage, each as short as it can be: `also VideoGenerator/`, `also /QwenVLCaptioner`."""
    first_type, first_name = labels[0].split("/")
    short = []
    for label in labels[1:]:
        step_type, name = label.split("/")
        short.append(f"{step_type}/" if name == first_name else f"/{name}" if step_type == first_type else label)
    return f"  (also {', '.join(dict.fromkeys(short))})" if short else ""


def cmd_steps(args: argparse.Namespace) -> int:
    grouped = _stages_by_target()
    if args.name:
        wanted = args.name.lower()
        chosen = {t: labels for t, labels in grouped.items() if any(wanted in lab.lower() for lab in labels)}
        if not chosen:
            names = sorted({lab.split("/")[1] for labels in grouped.values() for lab in labels})
            guess = difflib.get_close_matches(args.name, names, n=1, cutoff=0.5)
            print(
                f"no stage named {args.name!r}.{f' Did you mean {guess[0]}?' if guess else ''} Known: {', '.join(names)}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        for target, labels in chosen.items():
            print(f"{labels[0]}  ({target}){_aliases(labels)}")
            try:
                fields = _fields(labels[0])
            except ImportError as exc:
                print(f"    (cannot import: {exc})")
                continue
            for key, field in fields.items():
                print(f"    {key} = {_default(field)}: {field.description or ''}")
            print(f"    + runtime keys: {', '.join(RUNTIME_KEYS_ORDER)} (see the README's config reference)")
        return EXIT_OK
    for labels in grouped.values():
        print(f"{labels[0]}{_aliases(labels)}")
        if args.verbose:
            try:
                keys = ", ".join(_fields(labels[0]))
            except ImportError as exc:
                keys = f"(cannot import: {exc})"
            print(textwrap.fill(keys, width=100, initial_indent="    ", subsequent_indent="    "))
    if args.verbose:
        print("`reelflow steps NAME` describes one stage's keys, with defaults.")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from daemon import oneshot

    config = _load_checked(args.config, one_shot=True)
    if config is None:
        return EXIT_CONFIG
    _setup_logging(args.log_level or config.daemon.log_level)
    try:
        return oneshot.main(config, progress=not args.no_progress)
    except Exception as exc:  # noqa: BLE001 - a stage's load may raise anything; say it in one line
        return _startup_failed(exc)


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon import demo, oneshot

    folder = Path(args.folder).resolve()
    for quiet in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_PROGRESS_BAR"):  # the loaders' bars drown the output
        os.environ.setdefault(quiet, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    _setup_logging(args.log_level or "WARNING")
    print(f"reelflow demo: building tiny random-weight models and sample clips under {folder} ...", flush=True)
    config_file = demo.prepare(folder)
    config = _load_checked(str(config_file), network=False)
    if config is None:
        return EXIT_CONFIG
    try:
        code = oneshot.main(config, progress=not args.no_progress)
    except Exception as exc:  # noqa: BLE001 - a stage's load may raise anything; say it in one line
        return _startup_failed(exc)
    if code != EXIT_OK:
        return code
    results = config.file.save_folder / config.file.meta_path.with_suffix(".jsonl").name
    complete = demo.show(results)
    print(
        "For real captions and videos, edit the config's model_path (e.g. Qwen/Qwen2-VL-2B-Instruct) and run it "
        "on a GPU with pip install 'reelflow[vllm]': see the README's \"The demo\" section."
    )
    return EXIT_OK if complete else EXIT_RUNTIME


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.service.serve import Daemon

    config = _load_checked(args.config)
    if config is None:
        return EXIT_CONFIG
    _setup_logging(args.log_level or config.daemon.log_level)
    try:
        return asyncio.run(Daemon(config, Path(args.config).resolve(), log_level_pinned=bool(args.log_level)).run())
    except OSError as exc:
        log.error("%s", exc)
        return EXIT_RUNTIME
    except Exception as exc:  # noqa: BLE001 - a stage's load may raise anything; say it in one line
        return _startup_failed(exc)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reelflow")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="reelflow", description="Streaming video-dataset daemon: inbox -> model stages -> outbox."
    )
    top.add_argument("--version", action="version", version=f"reelflow {_version()}")
    sub = top.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("serve", "run the daemon over daemon.inbox / daemon.outbox"),
        ("run", "one-shot: process meta_path into save_folder and exit"),
        ("check", "validate a config, print every problem, exit 2 on any"),
    ):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("--config", "-c", required=True, help="the YAML config file")
        if name != "check":
            cmd.add_argument(
                "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override daemon.log_level"
            )
        if name == "check":
            cmd.add_argument(
                "--offline", action="store_true", help="skip the hub lookups (hub ids only checked in the local cache)"
            )
        if name == "run":
            cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo = sub.add_parser("demo", help="offline smoke run: caption and generate on tiny random-weight models")
    demo.add_argument("--folder", default="reelflow-demo", help="where the clips, models and results go")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: WARNING")
    steps = sub.add_parser("steps", help="list the registered stages")
    steps.add_argument("name", nargs="?", help="one stage (e.g. Qwen2VLCaptioner): its keys, defaults and descriptions")
    steps.add_argument("--verbose", "-v", action="store_true", help="also list each stage's config keys")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("serve", "run", "demo"):
        limit_malloc_arenas()  # before any thread starts (see daemon/allocator.py)
    handlers = {"serve": cmd_serve, "run": cmd_run, "check": cmd_check, "steps": cmd_steps, "demo": cmd_demo}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
