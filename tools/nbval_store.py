"""A pytest plugin: keep the outputs of nbval's fresh run, for the book build.

`make test` executes every chapter once. nbval runs each notebook top to
bottom in a fresh kernel and compares every cell's outputs with the stored
ones; with this plugin and ``--nbval-store DIR``, each notebook whose every
cell passed is then written to ``DIR/<name>.ipynb``: the notebook as stored,
each code cell's outputs replaced by the fresh ones (figures included, which
nbval does not compare). ``tools/execute_chapters.py --from DIR`` puts those
copies into the jupyter-cache that the book build reads, so the book shows
the very outputs the tests checked, made minutes earlier by today's bnlib,
without executing every chapter a second time:

    python -m pytest -p tools.nbval_store --nbval --nbval-store _build/nbval chapters
    python tools/execute_chapters.py --from _build/nbval --cache _build/.jupyter_cache chapters/*.ipynb

A notebook with a failed, skipped or unrun cell is not written, and
``--from`` then refuses to cache it. Works under pytest-xdist with
``--dist loadscope`` (each notebook's cells run in one worker, which writes it).
"""
from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest

STORE_OPTION = "--nbval-store"


def pytest_addoption(parser):
    parser.addoption(
        STORE_OPTION, metavar="DIR", default=None,
        help="write each notebook whose cells all passed under nbval, with its fresh outputs, to DIR")


class _FreshOutputs:
    """Per notebook: the fresh outputs of its cells that passed, and whether any did not."""

    def __init__(self, store_dir: Path):
        self.store_dir = store_dir
        # notebook path -> {cell number: outputs}
        self.passed: dict[Path, dict[int, list]] = {}
        self.spoiled: set[Path] = set()
        # notebook path -> the notebook nbval read, and its seconds in cells
        self.notebooks: dict[Path, object] = {}
        self.seconds: dict[Path, float] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        notebook = getattr(item.parent, "nb", None)
        if notebook is None or not hasattr(item, "test_outputs") or not hasattr(item, "cell_num"):
            return  # not an nbval cell
        path = Path(str(item.parent.path))
        self.notebooks[path] = notebook
        self.seconds[path] = self.seconds.get(path, 0.0) + report.duration
        if report.when == "call" and report.passed and item.test_outputs is not None:
            self.passed.setdefault(path, {})[item.cell_num] = item.test_outputs
        elif report.failed or report.skipped:
            self.spoiled.add(path)

    def pytest_sessionfinish(self, session):
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for path, notebook in self.notebooks.items():
            fresh = self.passed.get(path, {})
            executed = executed_copy(notebook, fresh)
            if path in self.spoiled or executed is None:
                continue
            executed.metadata["nbval_store"] = {"execution_seconds": round(self.seconds[path], 1)}
            nbformat.write(executed, self.store_dir / path.name)


def executed_copy(notebook, fresh_outputs: dict[int, list]):
    """The notebook with code cell ``k``'s outputs replaced by ``fresh_outputs[k]``
    and execution counts 1, 2, ... as a fresh kernel numbers them; None when
    a code cell has no fresh outputs (it failed, was skipped or never ran)."""
    executed = copy.deepcopy(notebook)
    code_cells = [cell for cell in executed.cells if cell.cell_type == "code"]
    if set(fresh_outputs) != set(range(len(code_cells))):
        return None
    for number, cell in enumerate(code_cells):
        cell.outputs = fresh_outputs[number]
        cell.execution_count = number + 1
        for output in cell.outputs:
            if output.get("output_type") == "execute_result":
                output["execution_count"] = number + 1
    return executed


def pytest_configure(config):
    store_dir = config.getoption(STORE_OPTION)
    if store_dir is None:
        return
    if not (config.getoption("nbval", default=False) or config.getoption("nbval_lax", default=False)):
        raise pytest.UsageError(f"{STORE_OPTION} stores nbval's outputs: run it with --nbval or --nbval-lax")
    config.pluginmanager.register(_FreshOutputs(Path(store_dir).resolve()), "nbval_store_outputs")
