"""Which cells print something else in the built book than in the notebook?

`make book` executes every chapter fresh, and the HTML shows those outputs,
not the ones stored in `chapters/*.ipynb`. On another CPU the cells tagged
`nbval-ignore-output` (chaotic training runs) can print other digits. Prose
that quotes such a cell must hold for both (CONTRIBUTING.md, "A chapter").
After `make book`, this lists every code cell whose text output differs
between the stored notebook and the build's execution, line by line:

    python tools/stored_vs_fresh.py                 # every chapter
    python tools/stored_vs_fresh.py chapters/11_bn_in_practice.ipynb

It reads the executed notebooks that the build left in its jupyter-cache
(`_build/.jupyter_cache`, see `execute:` in _config.yml) and matches cells by
their source. Exit status 0 either way: a difference is for a person to judge.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Object addresses (<Figure at 0x7f...>) differ on every run and mean nothing.
ADDRESS = re.compile(r"0x[0-9a-f]+")


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def text_output(cell: dict) -> str:
    """The cell's printed text and text/plain results, as nbval reads them."""
    parts = []
    for output in cell.get("outputs", []):
        text = output.get("text") or output.get("data", {}).get("text/plain", "")
        parts.append("".join(text) if isinstance(text, list) else text)
    return ADDRESS.sub("0x", "".join(parts))


def executed_notebooks(cache: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(cache.glob("executed/*/base.ipynb"))]


def differences(chapter: dict, executed: list[dict]) -> list[tuple[dict, list[tuple[str, str]]]]:
    """(stored cell, [(stored line, fresh line), ...]) for each cell that differs."""
    code = [cell for cell in chapter["cells"] if cell["cell_type"] == "code"]
    sources = {cell_source(cell) for cell in code}
    # The executed copy of this chapter is the one sharing the most cells.
    best = max(executed, key=lambda nb: sum(cell_source(c) in sources for c in nb["cells"]), default=None)
    if best is None:
        return []
    fresh = {cell_source(cell): cell for cell in best["cells"] if cell["cell_type"] == "code"}
    found = []
    for cell in code:
        match = fresh.get(cell_source(cell))
        if match is None:
            continue
        stored_text, fresh_text = text_output(cell), text_output(match)
        if stored_text != fresh_text:
            stored_lines, fresh_lines = stored_text.splitlines(), fresh_text.splitlines()
            width = max(len(stored_lines), len(fresh_lines))
            stored_lines += [""] * (width - len(stored_lines))
            fresh_lines += [""] * (width - len(fresh_lines))
            found.append((cell, [(a, b) for a, b in zip(stored_lines, fresh_lines) if a != b]))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", type=Path, help="default: chapters/*.ipynb")
    parser.add_argument("--cache", type=Path, default=ROOT / "_build" / ".jupyter_cache")
    args = parser.parse_args(argv)
    executed = executed_notebooks(args.cache)
    if not executed:
        print(f"no executed notebooks in {args.cache}: run `make book` first", file=sys.stderr)
        return 2
    total = 0
    for path in args.chapters or sorted((ROOT / "chapters").glob("*.ipynb")):
        for cell, lines in differences(json.loads(path.read_text()), executed):
            total += 1
            tags = cell.get("metadata", {}).get("tags", [])
            print(" ".join(["==", path.name, "cell", str(cell.get("id")), *tags]))
            for stored, fresh in lines:
                print(f"  stored: {stored}")
                print(f"  fresh:  {fresh}")
    print(f"{total} cell(s) print something else in the build than in the notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
