"""tools/stored_vs_fresh.py: which cells print other digits in the build."""

import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "stored_vs_fresh.py"


def notebook(*cells: tuple[str, str]) -> nbformat.NotebookNode:
    """A notebook of code cells, each (source, printed text)."""
    nb = nbformat.v4.new_notebook()
    for source, printed in cells:
        cell = nbformat.v4.new_code_cell(source)
        if printed:
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed)]
        nb.cells.append(cell)
    return nb


def test_lists_the_cells_whose_text_differs_line_by_line(tmp_path):
    chapter = tmp_path / "chapter.ipynb"
    stored = notebook(("print(1)", "1\n"), ("run()", "lr 0.1  78.7%\nlr 1.0  diverged\n"),
                      ("fig", "<Figure at 0x7f00>\n"))
    stored.cells.insert(0, nbformat.v4.new_markdown_cell("# A chapter"))
    nbformat.write(stored, chapter)
    # The cache keeps code cells only, as jupyter-cache stores them; the
    # other chapter's copy must not be matched to this one.
    fresh = notebook(("print(1)", "1\n"), ("run()", "lr 0.1  80.7%\nlr 1.0  diverged\n"),
                     ("fig", "<Figure at 0x7fff>\n"))
    other = notebook(("print(2)", "2\n"))
    for name, nb in (("a", fresh), ("b", other)):
        (tmp_path / "cache" / "executed" / name).mkdir(parents=True)
        nbformat.write(nb, tmp_path / "cache" / "executed" / name / "base.ipynb")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cache", str(tmp_path / "cache"), str(chapter)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"== chapter.ipynb cell {stored.cells[2].id}",
        "  stored: lr 0.1  78.7%",
        "  fresh:  lr 0.1  80.7%",
        "1 cell(s) print something else in the build than in the notebooks",
    ]


def test_says_what_to_run_when_there_is_no_build(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cache", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "make book" in proc.stderr
