"""Docs that exist where they are referenced: every pointer into the docs from code, configs and the
systemd unit lands on a file or a README section that is there."""

from __future__ import annotations

import re

from tests.harness import REPO

ROOT = REPO
SOURCES = [
    *sorted((ROOT / "configs").rglob("*.yaml")),
    *sorted((ROOT / "configs").rglob("*.service")),
    *sorted((ROOT / "daemon").rglob("*.py")),
    *sorted((ROOT / "stages").rglob("*.py")),
    ROOT / "README.md",
]


def _headings() -> set[str]:
    return {line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("#")}


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def test_referenced_doc_files_exist():
    missing = [
        f"{path.relative_to(ROOT)}: {ref}"
        for path in SOURCES
        for ref in re.findall(r"\bdocs/[\w./-]+\.md", path.read_text())
        if not (ROOT / ref).is_file()
    ]
    assert not missing, missing


def test_readme_sections_named_elsewhere_exist():
    headings = _headings()
    named = [
        (path.relative_to(ROOT), title)
        for path in SOURCES
        for title in re.findall(r"README's \\?[\"“]([^\"”\\]+)\\?[\"”]", path.read_text())
    ]
    assert named, "expected the configs and code to point at README sections"
    assert [f"{where}: {title}" for where, title in named if title not in headings] == []


def test_systemd_documentation_anchor_is_a_readme_section():
    unit = (ROOT / "configs" / "systemd" / "reelflow.service").read_text()
    (url,) = re.findall(r"^Documentation=(\S+)", unit, re.M)
    page, _, anchor = url.partition("#")
    assert page.endswith("/README.md") and anchor in {_slug(h) for h in _headings()}, url


def test_no_internal_tracker_or_machine_specific_wording():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"\bissues? \d+( and \d+)?\)", text), path
        assert "this CPU machine" not in text, path
