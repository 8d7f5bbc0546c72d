"""CONTRIBUTING.md lists every key of references.bib, so that a writer finds
the key to cite without opening the .bib file; and every listed key exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_contributing_lists_exactly_the_bib_keys():
    bib_keys = set(re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "references.bib").read_text(), re.M))
    listed = set(re.findall(r"^\| `([^`]+)` \|", (ROOT / "CONTRIBUTING.md").read_text(), re.M))
    assert bib_keys, "no keys found in references.bib"
    assert not bib_keys - listed, f"keys missing from CONTRIBUTING.md's table: {sorted(bib_keys - listed)}"
    assert not listed - bib_keys, f"keys in CONTRIBUTING.md but not in references.bib: {sorted(listed - bib_keys)}"
