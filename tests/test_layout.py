"""The structure, read from the code: no import cycles, no source file over 400 lines, `stages/`
never importing `daemon/`, and the folders DESIGN.md's "Layout" names.

How the import graph is built (`import_graph`): every `.py` file under daemon/ and stages/
is a node, named by its dotted module path (`daemon/hosts/ray/host.py` -> daemon.hosts.ray.host,
a package's `__init__.py` -> the package). Every `import` and `from ... import` statement in the
file is read with `ast`, relative ones resolved against the file's package, and becomes an edge
when its target is one of those modules (`from daemon.io import jobs` -> daemon.io.jobs when
that is a module, else daemon.io). Only our own modules are nodes, so third-party imports never
make edges, wherever they are written.

Imports inside functions count. A function-level import of one of our own modules is still a
dependency: it only moves the moment the module is loaded (the reason such imports exist here
is to keep heavy libraries, torch, vllm, ray, diffusers, off `import daemon`, and those are
third-party, so not in the graph anyway). A cycle closed through a lazy import is still two
modules reaching into each other, which is what this check is for. Imports under
`if TYPE_CHECKING:` count too: they never run, but a module written against another's type
depends on it as much as one that calls it (issue 11 names reload.py and serve.py importing
each other, and one of the two directions was such an import). A module that needs only part
of another's interface says so with a Protocol of its own.

Imports by string (stages/registry.py's dotted paths, `importlib.import_module`) are not
edges: the registry names stages, it does not depend on them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "stages")
MAX_LINES = 400

# DESIGN.md, "Layout": the parts of the runtime and of the stages, as folders and files.
LAYOUT = (
    "daemon/cli.py",
    "daemon/config.py",
    "daemon/metrics.py",
    "daemon/oneshot.py",
    "daemon/io/inbox.py",
    "daemon/io/jobs.py",
    "daemon/io/readers.py",
    "daemon/io/intake.py",
    "daemon/io/records.py",
    "daemon/io/outbox.py",
    "daemon/io/sinks.py",
    "daemon/runtime/engine.py",
    "daemon/runtime/pipeline.py",
    "daemon/runtime/worker.py",
    "daemon/runtime/batching.py",
    "daemon/hosts/base.py",
    "daemon/hosts/local.py",
    "daemon/hosts/ray/actor.py",
    "daemon/hosts/ray/cluster.py",
    "daemon/hosts/ray/host.py",
    "daemon/service/serve.py",
    "daemon/service/notify.py",
    "daemon/service/reload/plan.py",
    "daemon/service/reload/reloader.py",
    "daemon/service/reload/rollout.py",
    "stages/base.py",
    "stages/registry.py",
    "stages/engines/vllm.py",
    "stages/engines/hf_vision.py",
    "stages/engines/hf_causal.py",
    "stages/video/",
    "stages/captioners/",
    "stages/generators/",
    "stages/text/",
    "configs/",
    "tests/",
    "bench/",
    "pyproject.toml",
    "README.md",
    "run_pipeline.py",
)


def source_files(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    return sorted(path for package in packages for path in (root / package).rglob("*.py"))


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement: module level, in functions, under TYPE_CHECKING."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def imported_names(path: Path, tree: ast.AST, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, dotted name) for each name an import statement of `path` may load as a module."""
    own = module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    names: list[tuple[int, str]] = []
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names.append((node.lineno, base))
        names += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return names


def import_graph(
    root: Path = REPO, packages: tuple[str, ...] = PACKAGES
) -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    """Edges between our modules, and the line of the import that makes each edge."""
    files = {module_name(path, root): path for path in source_files(root, packages)}
    graph: dict[str, set[str]] = {name: set() for name in files}
    where: dict[tuple[str, str], int] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        by_statement: dict[int, list[str]] = defaultdict(list)
        for line, target in imported_names(path, tree, root):
            if target in files and target != name:
                by_statement[line].append(target)
        for line, targets in by_statement.items():
            # `from a import b`: the edge goes to a.b when it is a module, not also to the package a
            deepest = [t for t in targets if not any(o != t and o.startswith(t + ".") for o in targets)]
            for target in deepest:
                graph[name].add(target)
                where.setdefault((name, target), line)
    return graph, where


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_reader_sees_relative_lazy_and_type_checking_imports(tmp_path):
    """The reader itself, on a package written here: a relative import, an import inside a
    function and two under TYPE_CHECKING, so a cycle check that passes is not a blind one."""
    root = tmp_path / "daemon"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from .sub import b\n")
    (root / "sub" / "b.py").write_text("def f():\n    from daemon import c\n")
    (root / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from daemon import a\nelse:\n    import daemon.sub.b\n"
    )
    graph, _ = import_graph(tmp_path, ("daemon",))
    assert graph["daemon.a"] == {"daemon.sub.b"}
    assert graph["daemon.sub.b"] == {"daemon.c"}
    assert graph["daemon.c"] == {"daemon.a", "daemon.sub.b"}
    assert cycles(graph) == [["daemon.a", "daemon.c", "daemon.sub.b"]]


def test_no_import_cycles_in_daemon_and_stages():
    graph, where = import_graph()
    assert len(graph) > 50  # the reader found the code
    found = cycles(graph)
    described = []
    for component in found:
        members = set(component)
        edges = [
            f"{source} -> {target} (line {where[source, target]})"
            for source in component
            for target in sorted(graph[source] & members)
        ]
        described.append("; ".join(edges))
    assert not found, "import cycles (each: the imports among its modules):\n" + "\n".join(described)


def test_no_source_file_over_400_lines():
    long = {
        str(path.relative_to(REPO)): lines
        for path in source_files()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them along a seam): {long}"


def test_stages_never_import_daemon():
    offenders = []
    for path in sorted((REPO / "stages").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):  # TYPE_CHECKING imports too: a stage knows nothing of the runtime
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            else:
                continue
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno} imports {m}"
                for m in modules
                if m == "daemon" or m.startswith("daemon.")
            ]
    assert not offenders, "stages/ imports daemon/:\n" + "\n".join(offenders)


def test_the_layout_design_md_names_exists():
    missing = [
        entry for entry in LAYOUT if not ((REPO / entry).is_dir() if entry.endswith("/") else (REPO / entry).is_file())
    ]
    assert not missing, f"missing from DESIGN.md's Layout: {missing}"


def test_test_folders_mirror_the_code_folders():
    """tests/<path>/test_x.py tests the code in <path>/ (tests/daemon/hosts/ray -> daemon/hosts/ray),
    so a test is found where its code is, and a new folder beside the mirrored ones is caught."""
    tests = REPO / "tests"
    folders = {path.parent.relative_to(tests) for path in tests.rglob("test_*.py")}
    assert len(folders) > 10  # the walk found the tree
    astray = sorted(str(folder) for folder in folders if folder.parts and not (REPO / folder).is_dir())
    assert not astray, (
        f"test folders with no code folder of the same path: {astray}; move each under the path of "
        "the code it tests (tests/daemon/<io|runtime|hosts|service>/..., tests/stages/<family>/)"
    )
