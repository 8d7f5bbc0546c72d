r"""Measuring what batch norm costs: bytes moved, bytes kept, time against a copy.

The chapter "Making BN fast" asks how close a batch norm gets to the floor
that memory sets. Five groups of tools:

- :func:`op_traffic` runs a function and lists every tensor operation it
  dispatches with the bytes that operation reads (its tensor inputs) and
  writes (its outputs): the passes over memory as the op graph sees them.
- :func:`saved_tensors` lists the tensors autograd keeps for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks``), and :func:`peak_bytes` the
  most bytes that the operations had allocated at once.
- :func:`time_interleaved` and :func:`bench_cpu` time candidates round after
  round in the same process, with a copy of the same bytes as the floor;
  :func:`pin_glibc_malloc` keeps glibc's allocator from charging some of
  them for fresh pages.
- :func:`welford`, :func:`shifted_stats`, :func:`chan_merge` and
  :func:`naive_var`: per-channel statistics in float32, two one-pass ways
  (Welford + Chan, the method of the Triton kernels of b19d0fe, whose GPU
  times chapter 10 shows, and which since c40a2e0 they apply to each channel
  minus its first value, ``welford(x - x[0])``; and shifted sums, the C++ CPU
  kernels') and the way that fails.
- :func:`cpu_path`: ``bnlib.functional.batch_norm`` on one CPU path, to put
  the fused C++ kernels and the tensor ops side by side; :func:`bench_results`
  reads a results file that ``make bench`` committed.

Every count is in bytes; ``|x|`` is ``x.numel() * x.element_size()``.
"""

from __future__ import annotations

import statistics
import time
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["tensor_bytes", "op_traffic", "traffic_table", "saved_tensors", "peak_bytes", "time_interleaved",
           "pin_glibc_malloc", "pass_bytes", "bench_cpu", "cpu_path", "bench_results", "welford", "shifted_stats", "chan_merge", "naive_var"]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of distinct elements ``t`` addresses: a broadcast (stride 0) axis counts once.

    ``(1, C, 1, 1)`` expanded to ``(N, C, H, W)`` is ``C`` elements, not ``N*C*H*W``;
    a view whose windows overlap (``unfold``) counts at most the span of memory
    between its first and last element.
    """
    if not t.numel():
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    # Other overlapping views (unfold, as_strided) address no more than the
    # span from their first element to their last.
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(n, span) * t.element_size()


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


# Operations that allocate (and maybe fill) a tensor without reading any data.
_FACTORIES = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
              "ones", "ones_like", "full", "full_like", "new_zeros", "new_ones", "new_full", "scalar_tensor"}


class _Traffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view and func.__name__.split(".")[0] not in ("detach", "alias", "lift_fresh"):
            kw_in = {k: v for k, v in kwargs.items() if k != "out"}
            inputs = {(t.data_ptr(), tuple(t.shape), t.stride(), t.dtype): t for t in _tensors((args, kw_in))}
            read = sum(tensor_bytes(t) for t in inputs.values())  # x * x reads x once
            seen, written = set(), 0
            for t in _tensors(out):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    written += tensor_bytes(t)
            name = func.__name__.split(".")[0]
            if name in _FACTORIES:  # allocation: no data read; an empty one is not written either
                read = 0
                if "empty" in name:
                    written = 0
            self.ops.append({"op": func.__name__, "read": read, "written": written})
        return out


def op_traffic(fn, *args, **kwargs):
    """``(result, ops)``: ``fn(*args, **kwargs)`` and, for each tensor operation it ran,
    ``{"op": name, "read": bytes, "written": bytes}`` in order.

    ``read`` sums the bytes of the operation's distinct tensor inputs, ``written`` those of
    its outputs (an ``out=`` buffer is written, not read; an in-place op reads and
    writes its tensor). Views (``view``, ``expand``, ...) move nothing and are left
    out. This is the traffic *between* operations, assuming each streams its inputs
    once: what a fused kernel's inside does is invisible here (torch's native batch
    norm is one operation, ``read = |x|``, ``written = |y|``). Run the backward
    inside ``fn`` (``y.backward(dy)``) to count it too.
    """
    mode = _Traffic()
    with mode:
        result = fn(*args, **kwargs)
    return result, mode.ops


def traffic_table(ops, x_bytes, min_fraction=0.01):
    """Rows ``(op, read, written)`` in units of ``|x|`` (``x_bytes``), rounded to 2 decimals,
    for the operations of :func:`op_traffic` that move at least ``min_fraction * |x|``;
    operations that move nothing (allocations) are left out; the others (per-channel
    work on ``(C,)`` tensors) are summed into one last row
    ``("<k> per-channel ops", read, written)``. A ``"total"`` row closes the table."""
    rows, small = [], [0, 0, 0]
    total_read = total_written = 0
    for o in ops:
        if o["read"] == o["written"] == 0:  # allocation only
            continue
        total_read += o["read"]
        total_written += o["written"]
        if max(o["read"], o["written"]) >= min_fraction * x_bytes:
            rows.append((o["op"], round(o["read"] / x_bytes, 2), round(o["written"] / x_bytes, 2)))
        else:
            small[0] += 1
            small[1] += o["read"]
            small[2] += o["written"]
    if small[0]:
        rows.append((f"{small[0]} per-channel ops", round(small[1] / x_bytes, 2), round(small[2] / x_bytes, 2)))
    # the bytes summed, then rounded once (not a sum of rounded rows)
    rows.append(("total", round(total_read / x_bytes, 2), round(total_written / x_bytes, 2)))
    return rows


def saved_tensors(fn, *args, **kwargs):
    """``(result, saved)``: ``fn(*args, **kwargs)`` and the tensors autograd saved for
    the backward pass while it ran, as dicts ``{"shape", "dtype", "bytes", "is_arg"}``,
    each saved tensor once (one saved twice is not counted again). ``is_arg``: the
    tensor shares its storage with one of ``args`` (saving the input allocates nothing:
    it is alive anyway)."""
    saved, seen = [], set()
    arg_storages = {t.untyped_storage().data_ptr() for t in _tensors(args)}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            saved.append({"shape": tuple(t.shape), "dtype": t.dtype, "bytes": tensor_bytes(t),
                          "is_arg": key[0] in arg_storages})
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args, **kwargs)
    return result, saved


class _Peak(TorchDispatchMode):
    """Bytes of the tensors the operations created and that are still alive (by storage)."""

    def __init__(self, existing):
        super().__init__()
        self.live = {t.untyped_storage().data_ptr(): None for t in existing}
        self.current = self.peak = 0

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in _tensors(out):
            key = t.untyped_storage().data_ptr()
            if key not in self.live:
                nbytes = t.untyped_storage().nbytes()
                self.live[key] = [nbytes, 0]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            entry = self.live[key]
            if entry is not None:  # a tensor that existed before: not counted
                entry[1] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak_bytes(fn, *existing):
    """The most bytes that tensors created by ``fn()``'s operations held at one time.

    ``existing``: tensors that exist before (the input, ``dy``, parameters); writing
    into them is not an allocation. A storage counts from the operation that
    creates it until the last tensor on it is freed. Deterministic: it counts
    tensors, not the allocator's pages.
    """
    mode = _Peak(existing)
    with mode:
        fn()
    return mode.peak


def time_interleaved(fns, rounds=5, min_time=2e-3, clock=time.perf_counter):
    """Median seconds per call of each ``fns[name]()``, timed round after round.

    Each round times every candidate once (a loop of ``reps`` calls, ``reps``
    chosen so a loop takes at least ``min_time``), so a slow moment of a shared
    machine hits all of them alike. Returns ``{name: seconds}``.
    """
    reps = {}
    for name, fn in fns.items():  # warm up and calibrate
        fn()
        start = clock()
        fn()
        once = max(clock() - start, 1e-7)
        reps[name] = max(1, int(min_time / once))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            for _ in range(reps[name]):
                fn()
            times[name].append((clock() - start) / reps[name])
    return {name: statistics.median(v) for name, v in times.items()}


# mallopt's parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def pin_glibc_malloc(threshold=1 << 30):
    """Keep glibc's malloc from giving each large tensor fresh pages; True if done.

    By default glibc serves a block larger than its mmap threshold (128 KiB
    at first, raised up to 32 MiB as such blocks are freed) with a new
    ``mmap``, and hands memory freed at the top of its heap back to the system
    once more than its trim threshold is free. A tensor of a few MiB created
    in a timing loop can then get fresh pages from the system on every call,
    and their page faults (one per 4 KiB page, which the kernel fills with
    zeros) count in its time; whether it does depends on what was allocated
    and freed before, so it changes from one candidate, and one run, to the
    next. With both thresholds at ``threshold`` bytes, every smaller block
    comes from the heap and freed blocks are reused: what
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in the
    environment do at the process's start, done here (``mallopt``) for the
    allocations that follow. The process then keeps the memory it freed, up to
    its peak.

    Returns False, and changes nothing, where the C library is not glibc
    (macOS, Windows, musl) or glibc refuses the value.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))


def pass_bytes(kind, x_bytes):
    """Bytes a pass must move at least: ``fwd`` reads x once and writes y (``2|x|``);
    ``fwdbwd`` adds the backward's reads of x and dy and its write of dx (``5|x|``);
    ``eval`` reads x and writes y (``2|x|``)."""
    return {"fwd": 2, "fwdbwd": 5, "eval": 2}[kind] * x_bytes


def _passes(bn_fn, x, dy, w, b):
    C = x.shape[1]
    rm, rv = torch.zeros(C), torch.ones(C)
    xg = x.detach().clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            bn_fn(x, rm, rv, w, b, True)

    def fwdbwd():
        xg.grad = w.grad = b.grad = None
        bn_fn(xg, rm, rv, w, b, True).backward(dy)

    def eval_():
        with torch.no_grad():
            bn_fn(x, rm, rv, w, b, False)

    return {"fwd": fwd, "fwdbwd": fwdbwd, "eval": eval_}


def bench_cpu(shapes, impls, rounds=5, min_time=2e-3, seed=0, clock=time.perf_counter):
    """Time training forward, forward+backward and eval of each implementation on CPU.

    ``impls``: ``{name: fn}`` with the signature of ``torch.nn.functional.batch_norm``;
    the first is the baseline of ``ratio``. For each shape all candidates and the copy
    floor ``x.clone()`` (``2|x|`` bytes) run interleaved (:func:`time_interleaved`).
    Returns rows ``{"shape", "impl", "pass", "seconds", "bytes", "GBps",
    "copy_GBps", "pct_copy", "ratio"}``: ``bytes`` from :func:`pass_bytes`,
    ``pct_copy = 100 * (bytes / copy bandwidth) / seconds`` (100: as fast as a copy).
    Each call allocates its outputs anew, as a training step does: with glibc,
    call :func:`pin_glibc_malloc` first, or some candidates' times include
    page faults that others escape. ``clock``: as in :func:`time_interleaved`;
    ``time.thread_time`` (the calling thread's CPU time) leaves out the time the
    thread waits for a core on a busy machine, and suits one-thread runs only.
    """
    rows = []
    base = next(iter(impls))
    for shape in shapes:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g)
        dy = torch.randn(shape, generator=g)
        C = shape[1]
        w = torch.ones(C, requires_grad=True)
        b = torch.zeros(C, requires_grad=True)
        fns = {("copy", "copy"): x.clone}
        for name, fn in impls.items():
            for kind, f in _passes(fn, x, dy, w, b).items():
                fns[(name, kind)] = f
        t = time_interleaved(fns, rounds, min_time, clock)
        x_bytes = x.numel() * x.element_size()
        copy_bw = 2 * x_bytes / t[("copy", "copy")]
        for (name, kind), sec in t.items():
            if name == "copy":
                continue
            nbytes = pass_bytes(kind, x_bytes)
            rows.append({"shape": tuple(shape), "impl": name, "pass": kind, "seconds": sec, "bytes": nbytes,
                         "GBps": nbytes / sec / 1e9, "copy_GBps": copy_bw / 1e9,
                         "pct_copy": 100 * nbytes / copy_bw / sec, "ratio": sec / t[(base, kind)]})
    return rows


def cpu_path(name):
    """``bnlib.functional.batch_norm`` run on one CPU path, with the same signature.

    ``name``: ``"kernels"`` (the fused C++ loops of ``bnlib.cpu_kernels``) or
    ``"tensor_ops"`` (the formulas as torch tensor ops); see
    ``bnlib.functional.cpu_backend``.
    """
    from bnlib import functional as bnF

    if name not in ("kernels", "tensor_ops"):
        raise ValueError(f"cpu_path expects 'kernels' or 'tensor_ops', got {name!r}")

    def batch_norm(*args, **kwargs):
        with bnF.cpu_backend(name):
            return bnF.batch_norm(*args, **kwargs)

    batch_norm.__name__ = f"batch_norm_{name}"
    return batch_norm


def bench_results(name, start=None):
    """The JSON file ``bench/results/<name>`` that ``make bench`` committed, loaded.

    The file sits in the book's checkout, not in the installed package: it is
    looked for next to an editable install of bnlib, then in the folder
    ``start`` (default: the working directory, a chapter's folder when the
    chapter runs) and each folder above it, so a chapter finds it whether
    bnlib was installed with ``pip install -e .`` or ``pip install .``.
    """
    import json
    from pathlib import Path

    if not isinstance(name, str) or not name.endswith(".json") or "/" in name:
        raise ValueError(f"bench_results expects a file name such as 'gpu_h100.json', got {name!r}")
    start = Path.cwd() if start is None else Path(start)
    places = [Path(__file__).resolve().parents[1]] + [start.resolve(), *start.resolve().parents]
    for folder in places:
        path = folder / "bench" / "results" / name
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(
        f"bench/results/{name} was not found next to bnlib ({places[0]}) nor in {start} or a folder "
        "above it: run the chapter from the book's checkout")


def naive_var(x):
    """``E[x^2] - E[x]^2`` per column of ``x`` (m, C), in x's dtype: the formula that fails."""
    x = np.asarray(x)
    return (x * x).mean(axis=0) - x.mean(axis=0) ** 2


def chan_merge(a, b):
    """Merge two summaries ``(count, mean, M2)`` of disjoint sets (Chan, Golub, LeVeque 1983):

    ``n = n_a + n_b``, ``delta = mean_b - mean_a``,
    ``mean = mean_a + delta * n_b / n``, ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``.
    Works elementwise on arrays (one summary per channel, per lane); empty sides are allowed.
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    # the means' floating dtype (integer means are merged in float64)
    dtype = np.result_type(np.asarray(mean_a).dtype, np.asarray(mean_b).dtype, np.float16)
    w_b = np.where(n > 0, n_b / np.maximum(n, 1), 0).astype(dtype)
    # An empty side's mean (NaN, as np.mean of nothing gives) is not used.
    has_a, has_b = np.asarray(n_a) > 0, np.asarray(n_b) > 0
    delta = np.where(has_a & has_b, np.asarray(mean_b, dtype) - np.asarray(mean_a, dtype), 0).astype(dtype)
    mean = np.where(has_a, np.asarray(mean_a, dtype), np.asarray(mean_b, dtype)) + delta * w_b
    m2 = np.where(has_a, m2_a, 0).astype(dtype) + np.where(has_b, m2_b, 0).astype(dtype) + delta * delta * n_a * w_b
    return n, mean, m2


def welford(x, lanes=256):
    """Per-column ``(count, mean, M2)`` of ``x`` (m, C) in x's dtype (float32 for
    float16, as the kernels keep half inputs' statistics), the way the Triton kernels of
    commit b19d0fe (those of ``bench/results/gpu_h100.json``) did it: of ``x`` itself.
    Since commit c40a2e0 the kernels summarize each channel minus its first value
    (``triton_kernels._pivot``), which keeps every stored mean of the order of the
    spread: ``welford(x - x[0])`` is that method (its mean is then of ``x - x[0]``).

    The m rows are dealt to ``lanes`` lanes (row i to lane i % lanes); each lane runs
    Welford's update over its rows, ``count += 1; delta = x - mean;
    mean += delta / count; M2 += delta * (x - mean)``; then the lanes are merged
    pairwise with :func:`chan_merge` (a tree, as a GPU reduction does).
    The biased variance is ``M2 / count``.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"welford expects x of shape (m, C), got {x.ndim} dims")
    m, C = x.shape
    lanes = max(1, min(lanes, m))
    pad = -m % lanes
    valid = np.concatenate([np.ones(m, bool), np.zeros(pad, bool)]).reshape(-1, lanes)
    xs = np.concatenate([x, np.zeros((pad, C), x.dtype)]).reshape(-1, lanes, C)
    # half inputs in float32, as the kernels keep their statistics
    dtype = np.float32 if x.dtype == np.float16 else x.dtype
    count = np.zeros((lanes, C), dtype)
    mean = np.zeros((lanes, C), dtype)
    m2 = np.zeros((lanes, C), dtype)
    for row, ok in zip(xs, valid):
        ok = ok[:, None]
        count = count + ok
        delta = row - mean
        mean = mean + np.where(ok, delta / np.maximum(count, 1), 0)
        m2 = m2 + np.where(ok, delta * (row - mean), 0)
    parts = (count, mean, m2)
    while parts[0].shape[0] > 1:
        k = parts[0].shape[0]
        if k % 2:
            parts = tuple(np.concatenate([p, np.zeros((1, C), dtype)]) for p in parts)
        parts = chan_merge(tuple(p[0::2] for p in parts), tuple(p[1::2] for p in parts))
    return tuple(p[0] for p in parts)


def shifted_stats(x, block=64, summary_dtype=np.float64):
    """Per-column ``(count, mean, M2)`` of ``x`` (m, C) the way bnlib's C++ CPU kernels do it.

    The rows are read once, ``block`` at a time. Each block is summed as
    ``d = x - a`` in x's dtype, with a shift ``a`` close to the column's mean:
    the block's own mean for the first block, the mean so far after that.
    The block's mean is ``a + sum(d) / n_b`` and its ``M2 = sum(d**2) - sum(d)**2 / n_b``
    (exact algebra, and no cancellation, since ``d`` is on the scale of the
    spread); blocks are merged into the running summary with
    :func:`chan_merge` in ``summary_dtype``: float64, as the kernels do. With
    ``np.float32`` (a control, not what the kernels do) the summary's mean,
    near the data's mean, is rounded to float32 in every merge, and its error
    reaches the variance as Welford's does.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"shifted_stats expects x of shape (m, C), got {x.ndim} dims")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    summary_dtype = np.dtype(summary_dtype)
    if summary_dtype not in (np.float32, np.float64):
        raise ValueError(f"summary_dtype must be float32 or float64, got {summary_dtype}")
    C = x.shape[1]
    summary = (0, np.zeros(C, summary_dtype), np.zeros(C, summary_dtype))
    for start in range(0, x.shape[0], block):
        rows = x[start:start + block]
        n_b = rows.shape[0]
        a = rows.mean(axis=0, dtype=x.dtype) if summary[0] == 0 else summary[1].astype(x.dtype)
        d = rows - a
        s1 = d.sum(axis=0, dtype=x.dtype).astype(summary_dtype)
        s2 = (d * d).sum(axis=0, dtype=x.dtype).astype(summary_dtype)
        block_mean = a.astype(summary_dtype) + s1 / summary_dtype.type(n_b)
        block_m2 = s2 - s1 * s1 / summary_dtype.type(n_b)
        summary = chan_merge(summary, (n_b, block_mean, block_m2))
    return summary
