"""The API pages (api_library.md, api_tools.md) document every public module
of bnlib, each once, and both pages are in the book's table of contents.

The pages are built by Sphinx's autodoc from the docstrings; the book's
build (warnings as errors, nitpicky) checks that every cross-reference in
them resolves. What it cannot see is a module that no page names: a new
module would silently have no reference page.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["api_library.md", "api_tools.md"]


def _documented():
    found = []
    for page in PAGES:
        found += re.findall(r"^\.\. automodule:: (bnlib\.\w+)", (ROOT / page).read_text(), flags=re.M)
    return found


def test_every_public_module_is_on_one_api_page():
    modules = sorted(f"bnlib.{p.stem}" for p in (ROOT / "bnlib").glob("*.py") if not p.stem.startswith("_"))
    documented = _documented()
    assert sorted(set(documented)) == modules, set(modules) ^ set(documented)
    assert len(documented) == len(set(documented)), "a module is documented twice"


def test_api_pages_are_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text()
    for page in PAGES:
        assert f"- file: {page[:-3]}\n" in toc, page
