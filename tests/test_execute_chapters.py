"""tools/execute_chapters.py: what `make book` runs before Jupyter Book.

The build reads the chapters' outputs from the jupyter-cache this script
fills; if the cache entry did not match what myst-nb looks up, the build
would quietly execute every chapter again, one at a time. A cell that raises
must fail the script and leave nothing in the cache.
"""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "execute_chapters.py"

pytest.importorskip("jupyter_cache")


def write_notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    nbformat.write(nb, path)
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_fills_the_cache_that_myst_nb_reads_and_reports_errors(tmp_path):
    from jupyter_cache import get_cache

    good = write_notebook(tmp_path / "good.ipynb", "import os\nprint(os.path.basename(os.getcwd()))", "6 * 7")
    bad = write_notebook(tmp_path / "bad.ipynb", "raise ValueError('a cell that fails')")
    cache_dir = tmp_path / "cache"
    proc = run_script("--jobs", "2", "--cache", str(cache_dir), str(good), str(bad))

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stderr and "a cell that fails" in proc.stderr
    assert "1 of 2 notebooks executed" in proc.stdout
    cache = get_cache(str(cache_dir))
    # myst-nb's lookup: the notebook as read from disk, matched on its code.
    record = cache.match_cache_notebook(nbformat.read(good, as_version=4))
    _, executed = cache.merge_match_into_notebook(nbformat.read(good, as_version=4))
    assert record.data["execution_seconds"] > 0
    assert executed.cells[0].outputs[0]["text"] == f"{tmp_path.name}\n", "runs in the notebook's folder"
    assert executed.cells[1].outputs[0]["data"]["text/plain"] == "42"
    with pytest.raises(KeyError):
        cache.match_cache_notebook(nbformat.read(bad, as_version=4))


def test_inplace_writes_outputs_and_drops_stale_timings(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb", "1 + 1")
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].metadata["execution"] = {"iopub.execute_input": "2020-01-01T00:00:00Z"}
    nbformat.write(nb, path)

    proc = run_script("--inplace", str(path))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    cell = nbformat.read(path, as_version=4).cells[0]
    assert cell.outputs[0]["data"]["text/plain"] == "2"
    assert "execution" not in cell.metadata


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0", "--inplace", "x.ipynb"], "--jobs must be at least 1"),
    (["--inplace", "no_such_notebook.ipynb"], "expected existing .ipynb files"),
    (["x.ipynb"], "one of the arguments --cache --inplace is required"),
])
def test_bad_arguments(args, message, capsys):
    # argparse's exit, in this process (a fresh interpreter per case took 2 s)
    with pytest.raises(SystemExit) as exit_:
        load_tool("execute_chapters").main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_kernel_that_dies_at_start_is_started_again(tmp_path, monkeypatch):
    """The kernel port race ("Address already in use", then "Kernel died before
    replying to kernel_info") ran no cell: the notebook is tried again, up to
    KERNEL_START_TRIES times; any other error is reported at once."""
    import types

    import jupyter_cache.executors.utils as utils

    module = load_tool("execute_chapters")
    path = write_notebook(tmp_path / "nb.ipynb", "1 + 1")
    calls = []

    def flaky(notebook, **kwargs):
        calls.append(1)
        if len(calls) < module.KERNEL_START_TRIES:
            raise RuntimeError("Kernel died before replying to kernel_info")
        return types.SimpleNamespace(nb=notebook, time=0.0, exc_string=None)

    monkeypatch.setattr(utils, "single_nb_execution", flaky)
    assert module.execute_notebook(str(path))[3] is None
    assert len(calls) == module.KERNEL_START_TRIES

    def broken(notebook, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(utils, "single_nb_execution", broken)
    with pytest.raises(RuntimeError, match="something else"):
        module.execute_notebook(str(path))
