"""The documentation's examples: every runnable Python block of README.md and docs/*.md runs.

Convention: a fenced ```python block runs when the line before it (blank lines
aside) is the HTML comment ``<!-- run -->``. Blocks of one file run in order,
each in a fresh namespace, in one scratch working directory per file that
looks like the repository root (its entries are symlinked, and ``../shared``
resolves as it does from the checkout), so examples may read
``../shared/data/...`` and ``examples/...`` and write outputs without touching
the checkout; ``COLUMNHUB_CACHE`` points to a temporary directory. Doctest
blocks (``>>>``) are left to their own tests (``tests/test_expressions.py``).
Blocks that need servers (Triton) or big inputs are simply not marked.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = "<!-- run -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")


def code_blocks(text: str) -> list[tuple[int, str, str, bool]]:
    """Fenced blocks of Markdown text: (first line number, language, code, marked runnable)."""
    lines = text.splitlines()
    blocks = []
    i = 0
    previous = ""  # the last non-blank line outside blocks
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        lang = m["info"].strip().split(" ")[0].lower() if m["info"].strip() else ""
        start = i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        code = "\n".join(line[indent:] for line in lines[start:j])
        blocks.append((start + 1, lang, code, previous == MARK))
        previous = ""
        i = j + 1
    return blocks


def runnable() -> list[object]:
    params = []
    for doc in DOCS:
        blocks = [
            (line, code)
            for line, lang, code, marked in code_blocks(doc.read_text())
            if marked and lang in ("python", "py") and not code.lstrip().startswith(">>>")
        ]
        if blocks:
            params.append(pytest.param(doc, blocks, id=str(doc.relative_to(REPO))))
    return params


def scratch_root(tmp_path: Path) -> Path:
    """A directory that stands in for the repository root (entries symlinked)."""
    root = tmp_path / "repo"
    root.mkdir()
    for entry in REPO.iterdir():
        if not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    shared = REPO.parent / "shared"
    if shared.exists():
        (tmp_path / "shared").symlink_to(shared)
    return root


@pytest.mark.parametrize(("doc", "blocks"), runnable())
def test_documented_examples_run(
    doc: Path, blocks: list[tuple[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = scratch_root(tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.setenv("COLUMNHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for line, code in blocks:
        # padded so a traceback names the line of the Markdown file
        source = "\n" * (line - 1) + code
        compiled = compile(source, str(doc), "exec")  # our own documentation, not user text
        exec(compiled, {"__name__": "__doc_example__"})  # noqa: S102


def test_code_blocks_parser() -> None:
    text = textwrap.dedent(
        """\
        intro
        <!-- run -->

        ```python
        x = 1
        ```
        ```python
        y = 2
        ```
        <!-- run -->
        text in between
        ```bash
        ls
        ```
        1. item
           <!-- run -->
           ```python
           z = 3
           ```
        """
    )
    assert code_blocks(text) == [
        (5, "python", "x = 1", True),
        (8, "python", "y = 2", False),
        (13, "bash", "ls", False),
        (18, "python", "z = 3", True),
    ]


def test_every_marked_block_is_python() -> None:
    """A ``<!-- run -->`` mark before a non-Python block is a mistake, not a no-op."""
    wrong = [
        f"{doc.relative_to(REPO)}:{line} ({lang or 'no language'})"
        for doc in DOCS
        for line, lang, _, marked in code_blocks(doc.read_text())
        if marked and lang not in ("python", "py")
    ]
    assert not wrong, f"<!-- run --> marks blocks that are not Python: {wrong}"


def test_spec_doc_has_runnable_examples() -> None:
    assert any(p.id == os.path.join("docs", "spec.md") for p in runnable())  # type: ignore[attr-defined]
