# README.md and docs/: relative links resolve, every `make X` and `pptk X` named exists, the README is short.
import argparse
import re
from pathlib import Path

import pytest

from pptk.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "docker" / "README.md"]
README_MAX_LINES = 260

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
MAKE = re.compile(r"(?<![\w./-])make\s+([A-Za-z][\w-]*)")
PPTK = re.compile(r"(?<![\w.-])pptk\s+([a-z][\w-]*)(?:\s+([a-z][\w-]*))?")


def _ids(pages):
    return [str(page.relative_to(ROOT)) for page in pages]


def _code(text: str) -> list[str]:
    """Fenced blocks (except ```text ones, which show program output) and inline `code` spans."""
    blocks = [body for info, body in FENCE.findall(text) if info.strip() != "text"]
    return blocks + re.findall(r"`([^`]+)`", FENCE.sub("", text))


def _links(text: str) -> list[str]:
    """Relative link targets outside code: not http(s), mailto or a link to a heading on the same page."""
    targets = LINK.findall(FENCE.sub("", text))
    return [t for t in targets if not re.match(r"(https?|mailto):|#", t)]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces become hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _resolves(page: Path, target: str) -> bool:
    """The file exists relative to the page and, for a .md file, so does the heading an #anchor names."""
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve()
    if not anchor or not file.exists() or file.suffix != ".md":
        return file.exists()
    return anchor in map(_anchor, HEADING.findall(file.read_text()))


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", (ROOT / "Makefile").read_text(), re.M))


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page):
    broken = [target for target in _links(page.read_text()) if not _resolves(page, target)]
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_make_targets_exist(page):
    named = {m for code in _code(page.read_text()) for m in MAKE.findall(code)}
    assert named <= _make_targets(), f"{page.relative_to(ROOT)} names no such make target: {named - _make_targets()}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_pptk_commands_exist(page):
    commands = _subcommands(build_parser())
    unknown = set()
    for code in _code(page.read_text()):
        for name, nested in PPTK.findall(code):
            children = _subcommands(commands[name]) if name in commands else {}
            if name not in commands or (children and nested and nested not in children):
                unknown.add(f"pptk {name} {nested}".strip())
    assert not unknown, f"{page.relative_to(ROOT)} names no such pptk command: {sorted(unknown)}"


def test_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(text)}
    unlinked = [page.name for page in DOCS if page.resolve() not in linked]
    assert DOCS and not unlinked, f"README.md does not link to docs/{unlinked}"


def test_every_test_the_failure_table_names_exists():
    """docs/failures.md: each row names its tests as `unit/test_x.py::test_y` (or `::test_z` for the same file)."""
    text = (ROOT / "docs" / "failures.md").read_text()
    missing = []
    for row in (line for line in text.splitlines() if line.startswith("| ")):
        current = None
        for path, name in re.findall(r"`(?:((?:unit|distributed)/test_\w+\.py))?(?:::(\w+))?", row):
            current = path or current
            if current is None:
                continue
            source = (ROOT / "tests" / current).read_text() if (ROOT / "tests" / current).is_file() else None
            if source is None:
                missing.append(current)
            elif name and not re.search(rf"def {name}\b", source):
                missing.append(f"{current}::{name}")
    assert not missing, f"docs/failures.md names tests that do not exist: {missing}"
