"""The repository's text files hold no ASCII control characters but the newline (and the
Makefile's tabs).

An escape sequence expanded by accident ("\\b", "\\a", "\\t", "\\r" in a
string that was meant to be raw) turns ``\\begin``, ``\\alpha``, ``\\text`` and
``\\rVert`` in a docstring or a chapter's math into a backspace, a bell, a tab
and a line break: the formula is garbled, and nothing else fails.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # make needs its tabs


def _tracked(*patterns):
    listed = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout: every file on disk
        return sorted(p for pattern in patterns for p in ROOT.rglob(pattern)
                      if not {".venv", "_build", ".git"} & set(p.relative_to(ROOT).parts))
    return [ROOT / name for name in listed.stdout.split()]


def _where(text, control=CONTROL):
    match = control.search(text)
    if match is None:
        return None
    line = text.count("\n", 0, match.start()) + 1
    return f"line {line}: {match.group()!r} in {text[max(0, match.start() - 30):match.end() + 10]!r}"


def test_text_files_have_no_control_characters():
    files = _tracked("*.py", "*.md", "*.yml", "*.cfg", "*.toml", "*.bib", "Makefile")
    assert len(files) > 20
    found = {str(path.relative_to(ROOT)): _where(path.read_text(encoding="utf-8"),
                                                 CONTROL_BUT_TAB if path.name == "Makefile" else CONTROL)
             for path in files}
    assert not {k: v for k, v in found.items() if v}, found


@pytest.mark.parametrize("path", _tracked("chapters/*.ipynb"), ids=lambda p: p.name)
def test_notebook_cells_have_no_control_characters(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    found = {cell["id"]: _where("".join(cell["source"])) for cell in cells}
    assert not {k: v for k, v in found.items() if v}, found
