"""Every ```python snippet of README.md runs as it is (each in a fresh namespace, in a temp dir)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, str]]:
    """(title of the section holding it, code) for every python block of the README."""
    text = README.read_text()
    out = []
    for match in SNIPPET.finditer(text):
        prose = SNIPPET.sub("", text[: match.start()])  # "# comment" lines in code are not headings
        headings = re.findall(r"^#+ (.+)$", prose, re.M)
        out.append((headings[-1] if headings else "top", match.group(1)))
    return out


def test_readme_has_snippets():
    assert len(snippets()) >= 1


@pytest.mark.parametrize("title,code", snippets(), ids=[f"{i}:{t}" for i, (t, _) in enumerate(snippets())])
def test_snippet_runs(title, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"README.md [{title}]", "exec"), {"__name__": "__readme__"})
