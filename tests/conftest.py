"""Shared pytest fixtures: seeded generators for every test, and the book
checks' server (tests/test_book_browser.py).

bnlib's test helpers live in tests/helpers.py. Nothing here imports
Playwright, so the unit tests run without it.
"""

from __future__ import annotations

import functools
import http.server
import random
import threading
import zlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _generators_seeded_by_test_name(request):
    """Every test starts with torch's, NumPy's and Python's global generators
    seeded from its own name: a test that draws from them sees the same
    numbers whatever ran before it in its process. (pytest-xdist deals the
    tests to its workers in another order on every run; an unseeded draw
    once gave a spectral-norm gradcheck a sigma near 0, and a failure.)"""
    import numpy as np
    import torch

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
BOOK_HTML = REPO_ROOT / "_build" / "html"


@pytest.fixture(scope="session")
def book_html_dir() -> Path:
    """The built HTML book; fails (not skips) when it has not been built."""
    if not (BOOK_HTML / "index.html").is_file():
        pytest.fail(
            f"{BOOK_HTML / 'index.html'} is missing: build the book first with "
            "`make book` (`make test` does this before running pytest)."
        )
    return BOOK_HTML


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="session")
def book_url(book_html_dir: Path):
    """Base URL of a local HTTP server on 127.0.0.1 (a free port) serving the book."""
    handler = functools.partial(_QuietHandler, directory=str(book_html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# Seconds each of the slowest test files takes (measured on the 2-core
# development machine, 2026-12-07, under `make test`, and for the chapters
# changed since then the saving their change measured). `make test` runs the
# chapters with tests/test_triton.py in one pool of two processes, then the
# other modules; each run starts its longest file first. Only their order
# matters: pytest-xdist hands whole files to its processes in collection
# order, and starting the longest first keeps one process from running a
# long file alone at the end (chapter 11 alone takes about four minutes:
# started last, it would run on long after the other process had finished).
SLOW_FILES_SECONDS = {
    "chapters/11_bn_in_practice.ipynb": 235,
    "tests/test_triton.py": 170,
    "chapters/08_across_devices.ipynb": 125,
    "chapters/09_alternatives.ipynb": 122,
    "chapters/04_bn_algorithm.ipynb": 115,
    "chapters/06_what_bn_does.ipynb": 113,
    "chapters/07_why_bn_works.ipynb": 110,
    "chapters/01_why_normalize.ipynb": 55,
    "tests/test_cpu_kernels.py": 41,
    "chapters/05_train_vs_inference.ipynb": 28,
    "tests/test_export.py": 24,
    "chapters/10_making_bn_fast.ipynb": 13,
}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    _skip_bias_comparisons_on_old_torch(items)
    # After pytest's own reordering (trylast), a stable sort by file keeps
    # each file's tests in the order pytest gave them.
    items.sort(key=lambda item: -SLOW_FILES_SECONDS.get(item.nodeid.split("::")[0], 0))


def _skip_bias_comparisons_on_old_torch(items):
    """bnlib's modules follow the pinned torch (2.13), whose normalization
    modules take a keyword-only ``bias=`` and show it in their repr. On an
    older torch (the GPU machine has 2.11) the comparisons that need torch
    to take it are skipped with a reason, not failed: bnlib still takes it."""
    import inspect

    import torch

    if "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters:
        return
    skip = pytest.mark.skip(reason=f"torch {torch.__version__}'s norm modules take no bias= (added in 2.13)")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        uses_bias = any(isinstance(value, dict) and "bias" in value for value in params.values())
        if uses_bias or "constructor_signature" in item.name:
            item.add_marker(skip)


@pytest.fixture(scope="module", params=["kernels", "tensor_ops"])
def each_cpu_path(request):
    """Run a module's tests once on each CPU path of bnlib.functional: the
    fused C++ kernels (bnlib.cpu_kernels) and the tensor ops. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("each_cpu_path")``."""
    import bnlib.functional as BF
    from bnlib import cpu_kernels

    if request.param == "kernels" and not cpu_kernels.is_available():
        pytest.skip(f"bnlib's CPU kernels are not available here: {cpu_kernels._state['error']}")
    previous = BF.set_cpu_backend(request.param)
    yield request.param
    BF.set_cpu_backend(previous)
