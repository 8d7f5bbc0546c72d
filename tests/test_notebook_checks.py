"""The chapters' rule for outputs that differ between CPUs (CONTRIBUTING.md).

A cell whose printed numbers come from a chaotic training run differs in its
last digits between an Intel and an AMD machine, so it carries the tag
``nbval-ignore-output``: nbval runs it without comparing its text. What the
prose concludes from it must still be checked, by a code cell without that
tag (so its printed line is compared) with an ``assert``, which follows it
(after the prose that states the claim, if need be) before the next tagged
cell; tagged cells with only prose between them (a table, then its figure)
may share one check. nbval's other escapes (skipping a cell, or a comment
marker that a reader would not see in the cell's tags) are not used.

And every chapter fits the page: printed lines of at most 72 characters,
code lines of at most 78; and a cell whose code the page hides opens with a
comment that says what it does.
"""

from pathlib import Path

import nbformat
import pytest

CHAPTERS = sorted((Path(__file__).resolve().parent.parent / "chapters").glob("*.ipynb"))
IGNORE_OUTPUT = "nbval-ignore-output"
OTHER_ESCAPES = ("nbval-skip", "nbval-raises-exception", "nbval-check-output", "nbval-ignore")
COMMENT_MARKERS = ("# NBVAL_", "#NBVAL_")


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def unchecked_tagged_cells(cells) -> list[int]:
    """Code-cell indices of tagged cells that no untagged assert follows
    before the next tagged cell (or the notebook's end); a tagged cell with
    only prose before the next one is checked with it."""
    unchecked: list[int] = []
    pending: list[int] = []
    code_between = False  # untagged code, without an assert, since the last tagged cell
    code_index = -1
    for cell in cells:
        if cell.cell_type != "code":
            continue
        code_index += 1
        if IGNORE_OUTPUT in tags(cell):
            if code_between:
                unchecked += pending
                pending = []
            pending.append(code_index)
            code_between = False
        elif "assert " in cell.source:
            pending, code_between = [], False
        elif pending:
            code_between = True
    return unchecked + pending


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_ignored_output_is_followed_by_a_check(path):
    nb = nbformat.read(path, as_version=4)
    assert unchecked_tagged_cells(nb.cells) == [], (
        f"{path.name}: code cells tagged {IGNORE_OUTPUT} with no untagged cell asserting "
        "their claim before the next tagged cell"
    )


OUTPUT_WIDTH = 72  # what the page's output box shows without a scrollbar (CONTRIBUTING.md, "Fit the page")
CODE_WIDTH = 78  # what the page's code box shows without a scrollbar


def printed_text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return output.get("data", {}).get("text/plain", "") if "data" in output else ""


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_outputs_and_code_fit_the_page(path):
    nb = nbformat.read(path, as_version=4)
    too_wide = []
    for index, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        for line in cell.source.splitlines():
            if len(line) > CODE_WIDTH:
                too_wide.append(f"code cell {index}, code ({len(line)}): {line[:50]}")
        for output in cell.get("outputs", []):
            for line in printed_text(output).splitlines():
                if len(line) > OUTPUT_WIDTH:
                    too_wide.append(f"code cell {index}, output ({len(line)}): {line[:50]}")
    assert not too_wide, f"{path.name}: lines wider than the page:\n" + "\n".join(too_wide)


HIDDEN = ("hide-input", "remove-input", "hide-cell", "remove-cell")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_hidden_cells_say_what_they_do(path):
    """A cell whose code the page folds away opens with a comment (CONTRIBUTING.md):
    it is the first thing a reader who unfolds it sees."""
    nb = nbformat.read(path, as_version=4)
    silent = [index for index, cell in enumerate(c for c in nb.cells if c.cell_type == "code")
              if set(tags(cell)) & set(HIDDEN) and not cell.source.lstrip().startswith("#")]
    assert not silent, f"{path.name}: hidden code cells {silent} do not open with a comment"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_figures_are_stored_whatever_the_backend(path):
    """The first code cell starts with %matplotlib inline (CONTRIBUTING.md, "A
    chapter"): under another backend a figure is not stored, and its fig- name
    and every {numref} to it fail the build."""
    nb = nbformat.read(path, as_version=4)
    first = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert first.source.startswith("%matplotlib inline"), f"{path.name}: {first.source.splitlines()[0]!r}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_other_nbval_escapes(path):
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        assert not set(tags(cell)) & set(OTHER_ESCAPES), f"{path.name}: code cell {index} has {tags(cell)}"
        assert not any(m in cell.source for m in COMMENT_MARKERS), f"{path.name}: code cell {index} has an NBVAL_ comment"


def test_the_rule_itself():
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell

    def tagged(source):
        cell = code(source)
        cell.metadata["tags"] = [IGNORE_OUTPUT]
        return cell

    # a table and its figure, the prose, then one check for both
    shared = [md("text"), tagged("print(run())"), md("figure"), tagged("plot()"), md("claim"),
              code("plot_more()"), code("assert a < b\nprint('ok')"), md("more")]
    assert unchecked_tagged_cells(shared) == []
    # other code before the next tagged cell: the first one went unchecked
    skipped = [tagged("print(run())"), code("x = 1"), tagged("print(run2())"), code("assert a < b")]
    assert unchecked_tagged_cells(skipped) == [0]
    # an assert inside a tagged cell does not count: the check belongs in a cell
    # whose printed line nbval compares
    assert unchecked_tagged_cells([code("x = 1"), tagged("assert a < b")]) == [1]
