"""Command line: `reelflow serve | run | check | steps`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from daemon.config import Config, ConfigError, load_config
from stages.registry import known_stages, stage_class


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change set at INFO


# Exit codes, as the README documents them.
EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("reelflow")


def _load_checked(path: str, *, network: bool = True) -> Config | None:
    """The validated config, preflight passed; else the problems are printed and None returned."""
    from daemon.preflight import preflight

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
    problems = preflight(config, network=network)
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
    config = _load_checked(args.config, network=not args.offline)
    if config is None:
        return EXIT_CONFIG
    print(f"{args.config}: ok ({len(config.steps)} step(s): {', '.join(f'{s.type}/{s.name}' for s in config.steps)})")
    return 0


def cmd_steps(args: argparse.Namespace) -> int:
    for (step_type, name), target in sorted(known_stages().items()):
        print(f"{step_type}/{name}  ({target})")
        if args.verbose:
            try:
                fields = stage_class(step_type, name).Config.model_fields
            except ImportError as exc:
                print(f"    (cannot import: {exc})")
                continue
            for key, field in fields.items():
                default = "" if field.is_required() else f" = {field.get_default(call_default_factory=True)!r}"
                print(f"    {key}{default}: {field.description or ''}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from daemon import oneshot

    config = _load_checked(args.config)
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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="reelflow", description="Streaming video-dataset daemon: inbox -> model stages -> outbox."
    )
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
    steps.add_argument("--verbose", "-v", action="store_true", help="also list each stage's config keys")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handlers = {"serve": cmd_serve, "run": cmd_run, "check": cmd_check, "steps": cmd_steps, "demo": cmd_demo}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
