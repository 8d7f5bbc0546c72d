"""Execute the chapters fresh, several at a time, for the book build.

Jupyter Book executes notebooks one after another; on a 2-core machine that
leaves a core idle for the minutes the book build spends in its kernels. This
script runs the same execution (jupyter-cache's `single_nb_execution`, the call
myst-nb makes, with the settings of `_config.yml`) in `--jobs` worker
processes, each notebook in its own kernel and in the chapters' folder, and
stores the results in a jupyter-cache that the build then reads:

    python tools/execute_chapters.py --cache _build/.jupyter_cache chapters/*.ipynb
    jupyter-book build .        # execute_notebooks: cache -> "Using cached notebook"

`make book` deletes that cache first, so every build still executes every
chapter fresh (a cache kept across builds goes stale when bnlib changes: it is
keyed on the cells' source only). With `--inplace` the outputs are written
back into the notebooks instead (`make execute`).

`make test` executes each chapter once, under nbval, and keeps what that run
printed and drew (tools/nbval_store.py); `--from DIR` caches those copies
instead of executing anything, so the book shows the outputs the tests
checked:

    python tools/execute_chapters.py --from _build/nbval --cache _build/.jupyter_cache chapters/*.ipynb

A notebook whose cell raises is reported with its traceback and makes the
script exit non-zero; nothing is cached for it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nbformat

# The same limits as `execute:` in _config.yml.
TIMEOUT_S = 600
ALLOW_ERRORS = False
# A kernel that dies before its first reply has run no cell: the ports its
# manager picked were free when picked and taken when it bound them (another
# kernel or chapter 8's worker processes starting at the same moment; seen
# once in a fresh-clone CI run, "ZMQError: Address already in use"). Such a
# start is tried again; any other error is reported at once.
KERNEL_START_TRIES = 3


def execute_notebook(path: str) -> tuple[str, nbformat.NotebookNode, float, str | None]:
    """Run one notebook top to bottom in a fresh kernel, cwd = its folder."""
    from jupyter_cache.executors.utils import single_nb_execution

    for attempt in range(1, KERNEL_START_TRIES + 1):
        notebook = nbformat.read(path, as_version=4)
        try:
            result = single_nb_execution(
                notebook,
                cwd=str(Path(path).resolve().parent),
                timeout=TIMEOUT_S,
                allow_errors=ALLOW_ERRORS,
                meta_override=True,
            )
        except RuntimeError as error:
            if "before replying to kernel_info" not in str(error) or attempt == KERNEL_START_TRIES:
                raise
            print(f"{path}: the kernel died at start ({error}); starting another", file=sys.stderr, flush=True)
            continue
        return path, result.nb, result.time, result.exc_string


def store_in_cache(cache_path: str, path: str, notebook: nbformat.NotebookNode,
                   seconds: float) -> None:
    """Cache the executed notebook as myst-nb would after running it itself."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(cache_path)
    record = cache.add_nb_to_project(str(Path(path).resolve()))
    cache.cache_notebook_bundle(
        CacheBundleIn(notebook, record.uri, data={"execution_seconds": seconds}),
        check_validity=False,
        overwrite=True,
    )


def cache_executed_copies(cache_path: str, executed_dir: Path, notebooks: list[str]) -> int:
    """Cache ``executed_dir/<name>.ipynb`` for each notebook; 1 if any is missing or stale."""
    problems = []
    for path in notebooks:
        copy_path = executed_dir / Path(path).name
        if not copy_path.is_file():
            problems.append(f"{path}: no executed copy {copy_path} (a cell failed or was skipped under nbval, "
                            "or nbval did not run it)")
            continue
        executed = nbformat.read(copy_path, as_version=4)
        # The copy must be of today's notebook: the cache is keyed on the cells' source.
        stored = nbformat.read(path, as_version=4)
        if [c.source for c in executed.cells] != [c.source for c in stored.cells]:
            problems.append(f"{path}: {copy_path} has other cells than the notebook (edited since the test run?)")
            continue
        seconds = executed.metadata.get("nbval_store", {}).get("execution_seconds", 0.0)
        store_in_cache(cache_path, path, executed, seconds)
        print(f"cached {path}: the outputs of nbval's run ({seconds:.0f} s)", flush=True)
    for problem in problems:
        print(f"NOT CACHED  {problem}", file=sys.stderr, flush=True)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", help="the .ipynb files to execute")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--cache", help="jupyter-cache folder to fill (the one _config.yml names)")
    target.add_argument("--inplace", action="store_true", help="write the outputs into the notebooks")
    parser.add_argument("--from", dest="executed_dir", metavar="DIR",
                        help="cache the executed copies DIR/<name>.ipynb (nbval's, see tools/nbval_store.py) "
                             "instead of executing; needs --cache")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="notebooks run at once (default: the number of CPUs)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    missing = [nb for nb in args.notebooks if not Path(nb).is_file()]
    if missing:
        parser.error(f"expected existing .ipynb files, not found: {', '.join(missing)}")

    if args.executed_dir is not None:
        if args.cache is None:
            parser.error("--from fills a cache: give --cache DIR")
        return cache_executed_copies(args.cache, Path(args.executed_dir), args.notebooks)

    failed = []
    start = time.perf_counter()
    # Workers only execute; the parent alone writes the cache's sqlite database
    # and the notebook files, so no two processes write the same file.
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(args.notebooks))) as pool:
        futures = [pool.submit(execute_notebook, nb) for nb in args.notebooks]
        for future in as_completed(futures):
            path, notebook, seconds, traceback = future.result()
            if traceback is not None:
                failed.append(path)
                print(f"FAILED  {path} after {seconds:.0f} s\n{traceback}", file=sys.stderr, flush=True)
                continue
            if args.inplace:
                # Per-cell timestamps from an earlier run would be stale; the
                # cells' outputs are what the notebook stores.
                for cell in notebook.cells:
                    cell.metadata.pop("execution", None)
                nbformat.write(notebook, path)
            else:
                store_in_cache(args.cache, path, notebook, seconds)
            print(f"executed {path} in {seconds:.0f} s", flush=True)
    total = time.perf_counter() - start
    print(f"{len(args.notebooks) - len(failed)} of {len(args.notebooks)} notebooks executed "
          f"in {total:.0f} s ({args.jobs} at a time)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
