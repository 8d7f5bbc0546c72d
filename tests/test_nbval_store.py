"""tools/nbval_store.py and `execute_chapters.py --from`: how `make test`
builds the book from nbval's run instead of executing every chapter again.

The book must show what the tests checked: the fresh outputs (not the stored
ones), of notebooks whose every cell passed, under the cache key myst-nb
looks up; a notebook with a failing cell, or edited since, must not reach it.
"""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("nbval")
pytest.importorskip("jupyter_cache")


def write_notebook(path: Path, *cells: tuple[str, str | dict | None, list[str]]) -> Path:
    """Code cells (source, stored output, tags) after a markdown title; the
    output is printed text, a result's data (a dict), or None for none."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter")]
    for number, (source, printed, tags) in enumerate(cells, start=1):
        cell = nbformat.v4.new_code_cell(source, execution_count=number)
        if isinstance(printed, dict):
            cell.outputs = [nbformat.v4.new_output("execute_result", data=printed, execution_count=number)]
        elif printed is not None:
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed)]
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def execute_chapters(*args: str, capsys) -> tuple[int, str]:
    """tools/execute_chapters.py's main(args) in this process (a fresh
    interpreter took seconds): its exit code and what it wrote to stderr."""
    try:
        code = load_tool("execute_chapters").main(list(args))
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    return code, capsys.readouterr().err


def run_nbval(store: Path, *notebooks: Path, workers: int = 0) -> subprocess.CompletedProcess:
    parallel = ["-n", str(workers), "--dist", "loadscope"] if workers else ["-p", "no:xdist"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *parallel, "-p", "tools.nbval_store",
         "--nbval", "--nbval-current-env", "--nbval-store", str(store), *map(str, notebooks)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def nbval_run(tmp_path_factory):
    """One pytest run, on two workers as `make test` runs it, of a notebook
    that passes (one of its cells prints new text in a cell whose output is
    not compared) and one whose second cell prints other text than stored."""
    folder = tmp_path_factory.mktemp("chapters")
    good = write_notebook(folder / "good.ipynb",
                          ("print('same')", "same\n", []),
                          ("print('fresh')", "stale\n", ["nbval-ignore-output"]),
                          ("6 * 7", {"text/plain": "42"}, []))
    bad = write_notebook(folder / "bad.ipynb", ("print(1)", "1\n", []), ("print(3)", "2\n", []))
    store = folder / "store"
    proc = run_nbval(store, good, bad, workers=2)
    return good, bad, store, proc


def test_a_notebook_that_passes_is_written_with_its_fresh_outputs(nbval_run):
    good, _, store, proc = nbval_run
    assert "1 failed, 4 passed" in proc.stdout, proc.stdout + proc.stderr
    executed = nbformat.read(store / "good.ipynb", as_version=4)
    nbformat.validate(executed)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert [c.outputs[0]["text"] for c in code[:2]] == ["same\n", "fresh\n"]
    assert code[2].outputs[0]["output_type"] == "execute_result"
    assert code[2].outputs[0]["data"]["text/plain"] == "42"
    assert [c.execution_count for c in code] == [1, 2, 3]
    assert [c.source for c in executed.cells] == [c.source for c in nbformat.read(good, as_version=4).cells]
    assert executed.metadata["nbval_store"]["execution_seconds"] > 0


def test_a_notebook_with_a_failing_cell_is_not_written(nbval_run):
    _, _, store, _ = nbval_run
    assert not (store / "bad.ipynb").exists()


def test_from_caches_the_copies_under_the_key_myst_nb_looks_up(nbval_run, tmp_path, capsys):
    from jupyter_cache import get_cache

    good, bad, store, _ = nbval_run
    cache_dir = tmp_path / "cache"
    code, err = execute_chapters("--from", str(store), "--cache", str(cache_dir), str(good), str(bad), capsys=capsys)

    assert code == 1
    assert "NOT CACHED" in err and "bad.ipynb" in err and "good.ipynb" not in err
    cache = get_cache(str(cache_dir))
    _, merged = cache.merge_match_into_notebook(nbformat.read(good, as_version=4))
    assert merged.cells[2].outputs[0]["text"] == "fresh\n"
    with pytest.raises(KeyError):
        cache.match_cache_notebook(nbformat.read(bad, as_version=4))


def test_from_refuses_a_copy_of_an_edited_notebook(nbval_run, tmp_path, capsys):
    good, _, store, _ = nbval_run
    edited = tmp_path / "good.ipynb"
    nb = nbformat.read(good, as_version=4)
    nb.cells[1].source = "print('edited')"
    nbformat.write(nb, edited)
    code, err = execute_chapters("--from", str(store), "--cache", str(tmp_path / "c"), str(edited), capsys=capsys)
    assert code == 1 and "other cells than the notebook" in err


def test_from_needs_a_cache_and_the_plugin_needs_nbval(tmp_path, capsys):
    path = write_notebook(tmp_path / "nb.ipynb", ("1", None, []))
    code, err = execute_chapters("--from", str(tmp_path), "--inplace", str(path), capsys=capsys)
    assert code == 2 and "--from fills a cache" in err
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tools.nbval_store",
                           "--nbval-store", str(tmp_path / "s"), str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "run it with --nbval" in proc.stdout + proc.stderr
