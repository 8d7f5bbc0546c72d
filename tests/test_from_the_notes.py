"""The page "From the lecture notes" quotes the chapters: its numbers must be theirs.

Every number on the page with a decimal point or three digits or more must
occur in some chapter, in its prose or in a stored output. A chapter that is
re-executed or rewritten and no longer prints a number the page quotes makes
this test fail, and the page is brought up to date with it.
"""

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "from_the_notes.md"
# 0.964, 2.66, 5.1e-08, 1.378, 101035, 100,000; not the digits of 10^{-6} or x-30
NUMBER = re.compile(r"(?<![\w.^{-])(\d+\.\d+(?:e[+-]\d+)?|\d{3,}(?:,\d{3})*)")


def chapter_text() -> str:
    parts = []
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            parts.append(cell.source)
            for output in cell.get("outputs", []):
                parts.append(output.get("text", ""))
                parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_every_number_on_the_page_is_one_a_chapter_prints_or_states():
    numbers = list(dict.fromkeys(NUMBER.findall(PAGE.read_text(encoding="utf-8"))))
    assert len(numbers) > 100   # the pattern still finds the page's numbers
    text = chapter_text()
    missing = [n for n in numbers if n not in text]
    assert not missing, f"numbers on {PAGE.name} that no chapter prints or states: {missing}"


def test_the_page_names_all_five_sources():
    page = PAGE.read_text(encoding="utf-8")
    for source in ("*tutorial*", "*slides*", "*Q&A*", "*lecture*", "*blog*"):
        assert source in page
