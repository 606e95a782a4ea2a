"""The contract and design live in docs/ (docs/verifying.md §8): every tracked text file cites them
there, never a page outside the repository, and every "docs/<file>.md §<n>" citation names an
existing file and an existing numbered section heading of it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
THIS = Path(__file__).resolve()
# folders that are never part of the source tree when git cannot list the tracked files
UNTRACKED_DIRS = {".git", ".venv", ".venv-compat", "build", "dist", "__pycache__", ".pytest_cache", "local"}

# citations of the old pages outside the repository (SPEC.md, DESIGN.md, ENVIRONMENT.md, ../shared)
OUTSIDE = re.compile(r"\bSPEC\b|\bDESIGN(?:\.md\b| *§)|\bENVIRONMENT\.md\b|\.\./shared\b|/work/shared\b")
SECTION = r"§\s?(\d+[a-z]?(?:\.\d+)*)"
# "docs/contract.md §2", "§2, §5", "§3/§5", "§2-§5", "§2 and §8"
CITATION = re.compile(r"docs/([\w-]+\.md)((?:\s*(?:,|/|-|and)?\s*" + SECTION + r")*)")
HEADING = re.compile(r"^#{1,6}\s+(?:§\s?)?(\d+[a-z]?(?:\.\d+)*)[.)]?\s")


def _tracked_files() -> list[Path]:
    """Every tracked file (git ls-files), or, outside a git checkout, every file under the
    repository root but the virtual environments and build outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
        if names:
            return [ROOT / n for n in names if (ROOT / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        pass
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in UNTRACKED_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder) / f for f in files]
    return found


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (NUL bytes or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    files = {}
    for path in _tracked_files():
        if path.resolve() == THIS:  # this file spells the patterns out
            continue
        text = _text(path)
        if text is not None:
            files[path.relative_to(ROOT).as_posix()] = text
    return files


def _sections(doc: Path) -> set[str]:
    return {m.group(1) for line in doc.read_text(encoding="utf-8").splitlines() if (m := HEADING.match(line))}


def _expand(first: str, last: str) -> list[str]:
    """A range §2-§5 -> ["2", "3", "4", "5"] (plain integers; other ranges give their two ends)."""
    if first.isdigit() and last.isdigit() and int(first) <= int(last):
        return [str(n) for n in range(int(first), int(last) + 1)]
    return [first, last]


def cited_sections(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, docs file name, section ids) of every docs/<file>.md citation in ``text``."""
    found = []
    for m in CITATION.finditer(text):
        chain = m.group(2)
        ids = re.findall(SECTION, chain)
        if re.search(r"§\s?\d+[a-z]?(?:\.\d+)*\s*-\s*§", chain) and len(ids) == 2:
            ids = _expand(*ids)
        found.append((text.count("\n", 0, m.start()) + 1, m.group(1), ids))
    return found


def test_the_docs_exist_with_their_section_numbers():
    expected = {"contract.md": {"1", "2", "3", "4", "4b", "5", "6", "7", "8"},
                "architecture.md": {"1", "2", "3", "4", "5"},
                "kernels.md": set(), "verifying.md": set()}
    for name, sections in expected.items():
        assert (DOCS / name).is_file(), f"docs/{name} is missing"
        missing = sections - _sections(DOCS / name)
        assert not missing, f"docs/{name} lacks the section headings {sorted(missing)}"


def test_no_file_cites_a_page_outside_the_repository(texts):
    assert len(texts) > 100, f"found only {len(texts)} text files under {ROOT}"
    bad = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
           for name, text in sorted(texts.items()) for m in OUTSIDE.finditer(text)]
    assert not bad, ("these lines cite SPEC / DESIGN / ENVIRONMENT.md or a path outside the repository; cite "
                     "docs/contract.md, docs/architecture.md, docs/kernels.md or docs/verifying.md instead:\n"
                     + "\n".join(bad))


def test_every_docs_citation_names_an_existing_file_and_section(texts):
    cache: dict[str, set[str] | None] = {}
    bad, count = [], 0
    for name, text in sorted(texts.items()):
        for line, doc, ids in cited_sections(text):
            count += 1
            if doc not in cache:
                cache[doc] = _sections(DOCS / doc) if (DOCS / doc).is_file() else None
            if cache[doc] is None:
                bad.append(f"{name}:{line}: docs/{doc} does not exist")
                continue
            bad += [f"{name}:{line}: docs/{doc} has no section §{s}" for s in ids if s not in cache[doc]]
    assert count > 50, f"found only {count} docs/ citations; the citation pattern may be broken"
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("text, expected", [
    ("see docs/contract.md §5.", [(1, "contract.md", ["5"])]),
    ("(docs/contract.md §2, §5, §6)", [(1, "contract.md", ["2", "5", "6"])]),
    ("docs/contract.md §3/§5 and docs/architecture.md §3.3", [(1, "contract.md", ["3", "5"]),
                                                             (1, "architecture.md", ["3.3"])]),
    ("x\ndocs/contract.md §2-§5 in PyTorch", [(2, "contract.md", ["2", "3", "4", "5"])]),
    ("docs/contract.md §4b's rule", [(1, "contract.md", ["4b"])]),
    ("[docs/kernels.md](docs/kernels.md)", [(1, "kernels.md", []), (1, "kernels.md", [])]),
])
def test_citation_pattern(text, expected):
    assert cited_sections(text) == expected


@pytest.mark.parametrize("line, cited", [
    ("# SPEC §5: dropout", True), ("see SPEC.md", True), ("DESIGN §3.3", True),
    ("(see ENVIRONMENT.md)", True), ("../shared/anchors/mora.md", True),
    ("SPECIALS = ['<pad>']", False), ("FUSEDPEFT_MORA_DESIGN", False), ("DESIGNS = ('tile',)", False),
])
def test_outside_pattern(line, cited):
    assert bool(OUTSIDE.search(line)) is cited
