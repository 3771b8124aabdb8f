"""Which class runs a step: `(type, name)` as the config names it -> "module:Class".

A stage registers in its own file: its class says under which step types (and extra names)
the config may name it, as a literal `registered_as`:

    class Qwen2VLCaptioner(VideoCaptioner):
        registered_as = ("VideoCaptioner", "VideoCaptioner/QwenVLCaptioner")  # Type, or Type/Alias

A bare `Type` registers the class under its own name. The registry finds these by reading the
files under `stages/` (ast, no import), so modules are imported on first use, not at
`import stages`: `reelflow check` and the daemon's start-up stay fast and a missing optional
dependency only matters to the step that needs it. `reelflow steps` lists what is registered.
Third-party stages register through the `reelflow.stages` entry-point group, named
"Type.Name" with the value "module:Class".

For stages that live outside any installed package (tests, quick experiments), the
environment variable `REELFLOW_EXTRA_STAGES` adds more, comma-separated, in the same form:
`REELFLOW_EXTRA_STAGES="Test.SlowEcho=tests.stages_for_tests:SlowEcho,Test.Echo=mymod:Echo"`.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import os
from importlib.metadata import entry_points
from pathlib import Path

from stages.base import Stage

MARK = "registered_as"
ROOT = Path(__file__).resolve().parent


class UnknownStage(LookupError):
    pass


@functools.cache
def builtin_stages() -> dict[tuple[str, str], str]:
    """Every `registered_as` of a class in a file under `stages/`, read from the source."""
    return scan(ROOT, "stages")


def scan(root: Path, package: str) -> dict[tuple[str, str], str]:
    """`(type, name) -> "module:Class"` for the `registered_as` of the classes in `root`'s files."""
    found: dict[tuple[str, str], str] = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if MARK not in text:
            continue
        module = ".".join((package, *path.relative_to(root).with_suffix("").parts))
        for node in ast.parse(text, str(path)).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for label in _registered_as(node, path):
                step_type, _, name = label.partition("/")
                key, target = (step_type, name or node.name), f"{module}:{node.name}"
                if found.setdefault(key, target) != target:
                    raise UnknownStage(
                        f"{step_type}/{key[1]} is registered twice: by {found[key]} and by {target}; "
                        "rename one of them (registered_as)"
                    )
    return found


def _registered_as(node: ast.ClassDef, path: Path) -> tuple[str, ...]:
    for item in node.body:
        target = item.targets[0] if isinstance(item, ast.Assign) and len(item.targets) == 1 else None
        target = item.target if isinstance(item, ast.AnnAssign) else target
        if isinstance(target, ast.Name) and target.id == MARK and item.value is not None:
            try:
                labels = ast.literal_eval(item.value)
            except ValueError:
                labels = None
            if not (isinstance(labels, tuple) and all(isinstance(label, str) and label for label in labels)):
                raise UnknownStage(
                    f"{path}:{item.lineno}: {node.name}.{MARK} must be a literal tuple of strings, "
                    f"each 'Type' or 'Type/Name', e.g. (\"VideoFilter\",); got {ast.unparse(item.value)}"
                )
            return labels
    return ()


ENTRY_POINT_GROUP = "reelflow.stages"
EXTRA_STAGES_ENV = "REELFLOW_EXTRA_STAGES"


def known_stages() -> dict[tuple[str, str], str]:
    found = dict(builtin_stages())
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        step_type, _, name = entry.name.partition(".")
        if name:
            found.setdefault((step_type, name), entry.value)
    for item in filter(None, (part.strip() for part in os.environ.get(EXTRA_STAGES_ENV, "").split(","))):
        label, _, target = item.partition("=")
        step_type, _, name = label.strip().partition(".")
        if not (name and ":" in target):
            raise UnknownStage(
                f"{EXTRA_STAGES_ENV}: cannot read {item!r}; expected Type.Name=module:Class, comma-separated"
            )
        found.setdefault((step_type, name), target.strip())
    return found


def stage_class(step_type: str, name: str) -> type[Stage]:
    stages = known_stages()
    target = stages.get((step_type, name))
    if target is None:
        raise UnknownStage(_unknown_message(step_type, name, stages))
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def _unknown_message(step_type: str, name: str, stages: dict[tuple[str, str], str]) -> str:
    labels = [f"{t}/{n}" for t, n in sorted(stages)]
    guess = difflib.get_close_matches(f"{step_type}/{name}", labels, n=1, cutoff=0.5)
    hint = f" Did you mean {guess[0]}?" if guess else ""
    return f"no stage registered as type {step_type!r}, name {name!r}.{hint} Available: {', '.join(labels)}"
