"""Time bnlib's Triton kernels against torch's native batch norm on a CUDA GPU.

For each shape (ResNet-50's batch-norm inputs at batch 64, and (4096, 1024)),
dtype and memory layout, and for each pass -- training forward (``fwd``),
training forward + backward (``fwdbwd``), eval forward (``eval``) -- it times

- ``native``: ``torch.nn.functional.batch_norm`` (cuDNN or torch's CUDA kernels),
- ``triton``: ``bnlib.triton_kernels.batch_norm``,
- ``tensorop``: ``bnlib.functional.batch_norm`` with the Triton path switched
  off (tensor ops and the hand-written backward), when it is importable,
- ``copy``: ``torch.empty_like(x).copy_(x)``, the copy floor: no pass that
  reads and writes these bytes can beat a device-to-device copy by much.

How: all of a shape's variants run interleaved, round after round; before
each timed call L2 is flushed (a 256 MB buffer is read) and the GPU is given
a head start (``torch.cuda._sleep``) so that Python's launch overhead is not in
the numbers: the times are GPU times between CUDA events, the median of the
rounds. ``--wall`` adds the host-inclusive time per call of back-to-back
fwdbwd calls (what a small eager step sees).

Bytes a pass must move, counted as the kernels move them: ``fwd`` reads x
twice (statistics, then normalization) and writes y: ``3|x|``, or ``2|x|``
when x fits in half of L2 (the second read then hits L2); ``fwdbwd`` adds the
backward's two reads of x and dy and its write of dx: ``5|x|``, or ``3|x|``
when x and dy fit in half of L2; ``eval`` reads x and writes y: ``2|x|``.
``%copy`` is (those bytes / the copy's bandwidth) / time: 100% means the pass
runs at the copy's speed.

Usage (on the GPU machine):
    python bench/bench_gpu.py [--dtypes float32,bfloat16] [--layouts contiguous,channels_last]
                              [--rounds 40] [--out DIR] [--sweep] [--jobs 12] [--quick]
"""

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import subprocess

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnlib import triton_kernels as tk  # noqa: E402

RESNET50 = [
    (64, 64, 112, 112),
    (64, 64, 56, 56),
    (64, 256, 56, 56),
    (64, 128, 28, 28),
    (64, 512, 28, 28),
    (64, 256, 14, 14),
    (64, 1024, 14, 14),
    (64, 512, 7, 7),
    (64, 2048, 7, 7),
]
SHAPES = RESNET50 + [(4096, 1024)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = ("fwd", "fwdbwd", "eval")
LARGE_BYTES = 50e6  # "large shapes" for the bandwidth target: x of 50 MB or more (L2 is 50 MB)

# Configurations tried by --sweep (overrides of bnlib.triton_kernels.CONFIG).
SWEEP = [
    {},
    {"prefetch": True},
    {"programs_per_sm": 2},
    {"programs_per_sm": 2, "prefetch": True},
    {"programs_per_sm": 8},
    {"tile": 4096},
    {"tile": 4096, "prefetch": True},
    {"tile": 1024, "num_warps": 4},
    {"tile": 1024, "num_warps": 4, "programs_per_sm": 8},
    {"tile": 4096, "num_warps": 16, "programs_per_sm": 2},
    {"tile": 8192, "num_warps": 16, "programs_per_sm": 2, "prefetch": True},
    {"n_split": 1},
    {"n_split": 1, "tile": 4096, "num_warps": 16},
    {"block_c": 32},
    {"block_c": 128, "tile": 4096},
    {"block_c": 32, "programs_per_sm": 2, "prefetch": True},
    # The splits merged by a finalize kernel (three launches a pass) against
    # the default, where the elementwise kernels merge up to 64 splits (two).
    {"fuse_finalize_max_splits": 0},
    {"fuse_finalize_max_splits": 256},
]


def tensorop_batch_norm():
    """bnlib.functional.batch_norm with its Triton path switched off, or None."""
    try:
        from bnlib import functional
    except Exception as e:  # the tensor-op path may not be there yet
        print(f"# bnlib.functional not importable ({e!r}): no tensorop column")
        return None
    if not hasattr(functional, "_triton_path"):
        print("# bnlib.functional has no _triton_path switch: no tensorop column")
        return None
    functional._triton_path = lambda: None
    return functional.batch_norm


def make_case(shape, dtype, layout, device="cuda"):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=torch.float32).mul_(2).add_(0.5).to(dtype)
    dy = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    if layout == "channels_last":
        if x.dim() != 4:
            return None
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    pdt = torch.float32  # parameters and running stats in float32, as torch.nn keeps them under AMP
    w = torch.rand(C, device=device, dtype=pdt).add_(0.5).requires_grad_()
    b = torch.randn(C, device=device, dtype=pdt).requires_grad_()
    rm = torch.zeros(C, device=device, dtype=pdt)
    rv = torch.ones(C, device=device, dtype=pdt)
    return x, dy, w, b, rm, rv


def pass_fns(bn, x, dy, w, b, rm, rv):
    """Callables for the three passes of one implementation ``bn`` (F.batch_norm's signature)."""
    xg = x.detach().clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return bn(x, rm, rv, w, b, True, 0.1, 1e-5)

    def fwdbwd():
        y = bn(xg, rm, rv, w, b, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (xg, w, b), dy)

    def eval_():
        with torch.no_grad():
            return bn(x, rm, rv, w, b, False, 0.1, 1e-5)

    return {"fwd": fwd, "fwdbwd": fwdbwd, "eval": eval_}


@triton.jit
def _l2_flush_kernel(buf_ptr, out_ptr, BLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    """Read PER_PROGRAM blocks of buf and store one number: L2 ends up holding clean lines of buf."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(PER_PROGRAM):
        acc += tl.load(buf_ptr + (pid * PER_PROGRAM + i) * BLOCK + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid, tl.sum(acc))


_FLUSH = None


def flush_l2():
    """Evict L2 by reading 256 MB (5x L2) with a read-only kernel.

    Not by writing (``zero_``): that leaves L2 full of dirty lines, and the timed
    call would pay for writing them back (measured ~15 us on small shapes).
    """
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = (torch.ones(64 * 1024 * 1024, dtype=torch.float32, device="cuda"),
                  torch.empty(4096, dtype=torch.float32, device="cuda"))
    _l2_flush_kernel[(4096,)](_FLUSH[0], _FLUSH[1], BLOCK=1024, PER_PROGRAM=16, num_warps=8)


def time_interleaved(fns, rounds, sleep_cycles=4_000_000):
    """Median GPU time (us) of each callable; all run interleaved, L2 flushed before each call."""
    flush_l2()
    for fn in fns.values():  # warm-up: compilation, autotuning, allocator
        fn()
        fn()
    torch.cuda.synchronize()
    names = list(fns)
    events = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            flush_l2()
            torch.cuda._sleep(sleep_cycles)  # the GPU waits ~2 ms: the host queues the call meanwhile
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[n]()
            end.record()
            events[n].append((start, end))
    torch.cuda.synchronize()
    return {n: 1e3 * statistics.median(s.elapsed_time(e) for s, e in events[n]) for n in names}


def time_wall(fn, calls=30):
    """Host-inclusive time per call (us) of back-to-back calls: max(launch overhead, GPU time)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / calls


def pass_bytes(p, x_bytes, l2_bytes):
    fits = x_bytes <= l2_bytes / 2
    fits2 = 2 * x_bytes <= l2_bytes / 2
    fwd = (2 if fits else 3) * x_bytes
    if p == "fwd":
        return fwd
    if p == "fwdbwd":
        return fwd + (3 if fits2 else 5) * x_bytes
    return 2 * x_bytes


def check_case(x, dy, w, b, config=None):
    """Quick agreement with native before timing (relative 2-norm error of y and dx)."""
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ya = tk.batch_norm(xa, None, None, w, b, True, 0.1, 1e-5, config=config)
    yb = F.batch_norm(xb, None, None, w, b, True, 0.1, 1e-5)
    ga = torch.autograd.grad(ya, xa, dy)[0]
    gb = torch.autograd.grad(yb, xb, dy)[0]

    def rel(a, b_):
        return ((a.float() - b_.float()).norm() / b_.float().norm()).item()

    return rel(ya, yb), rel(ga, gb)


def bench_case(shape, dtype_name, layout, rounds, l2, tensorop, wall):
    case = make_case(shape, DTYPES[dtype_name], layout)
    if case is None:
        return []
    x, dy, w, b, rm, rv = case
    err_y, err_dx = check_case(x, dy, w, b)
    impls = {"native": F.batch_norm, "triton": tk.batch_norm}
    if tensorop is not None:
        impls["tensorop"] = tensorop
    fns = {}
    for name, bn in impls.items():
        for p, fn in pass_fns(bn, x, dy, w, b, rm, rv).items():
            fns[(name, p)] = fn
    fns[("copy", "copy")] = lambda: torch.empty_like(x).copy_(x)
    t = time_interleaved(fns, rounds)
    x_bytes = x.numel() * x.element_size()
    copy_bw = 2 * x_bytes / (t[("copy", "copy")] * 1e-6)
    rows = []
    launch = tk._view_and_launch(x, None)[1]
    for p in PASSES:
        nbytes = pass_bytes(p, x_bytes, l2)
        floor_us = nbytes / copy_bw * 1e6
        for name in impls:
            us = t[(name, p)]
            rows.append({
                "shape": list(shape), "dtype": dtype_name, "layout": layout, "pass": p, "impl": name,
                "us": round(us, 2), "ratio_to_native": round(us / t[("native", p)], 3),
                "x_bytes": x_bytes, "bytes": nbytes, "copy_floor_us": round(floor_us, 2),
                "pct_copy": round(100 * floor_us / us, 1), "GBps": round(nbytes / us / 1e3, 1),
            })
    for r in rows:
        r["copy_us"] = round(t[("copy", "copy")], 2)
        r["copy_GBps"] = round(copy_bw / 1e9, 1)
        r["max_rel_err_vs_native"] = max(err_y, err_dx) if r["impl"] == "triton" else None
        r["triton_grid"] = list(launch.grid)
    if wall:
        for name in ("native", "triton"):
            us = time_wall(fns[(name, "fwdbwd")])
            for r in rows:
                if r["impl"] == name and r["pass"] == "fwdbwd":
                    r["wall_us"] = round(us, 1)
    return rows


def print_table(rows, file=sys.stdout):
    by = {}
    for r in rows:
        by.setdefault((tuple(r["shape"]), r["dtype"], r["layout"], r["pass"]), {})[r["impl"]] = r
    hdr = f"{'shape':>20} {'dtype':>8} {'layout':>8} {'pass':>6} | {'copy':>7} {'native':>8} {'triton':>8} {'ratio':>6} {'%copy':>6} {'nat%cp':>6} | {'tensorop':>8} {'ratio':>6}"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for (shape, dt, lay, p), d in by.items():
        n, t = d["native"], d["triton"]
        to = d.get("tensorop")
        lay_s = "NHWC" if lay == "channels_last" else "NCHW" if len(shape) == 4 else "(N,C)"
        s = (f"{'x'.join(map(str, shape)):>20} {dt[:8]:>8} {lay_s:>8} {p:>6} | {t['copy_floor_us']:7.1f} "
             f"{n['us']:8.1f} {t['us']:8.1f} {t['ratio_to_native']:6.2f} {t['pct_copy']:6.1f} {n['pct_copy']:6.1f} | ")
        s += f"{to['us']:8.1f} {to['ratio_to_native']:6.2f}" if to else f"{'-':>8} {'-':>6}"
        print(s, file=file)


def markdown(result):
    """The results file as a Markdown table (one row per shape, dtype, layout and pass)."""
    m = result["meta"]
    out = [f"# bnlib Triton kernels vs torch native batch norm: {m['device']}", "",
           f"torch {m['torch']}, Triton {m['triton']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, {m['date']}, "
           f"bnlib at commit {m.get('commit') or '(not recorded)'}.", "",
           f"Timing: {m['timing']}; {m['rounds']} rounds.", "",
           f"Bytes per pass: {m['bytes']}. %copy: {m['pct_copy']}.", "",
           "Times in microseconds. `ratio` = triton / native (below 1: faster). `wall` = host-inclusive "
           "time per eager fwdbwd call, native / triton.", "",
           "| shape | dtype | layout | pass | copy floor | native | triton | ratio | triton %copy | native %copy "
           "| tensorop | tensorop ratio | wall native / triton |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for r in result["rows"]:
        by.setdefault((tuple(r["shape"]), r["dtype"], r["layout"], r["pass"]), {})[r["impl"]] = r
    for (shape, dt, lay, p), d in by.items():
        n, t, to = d["native"], d["triton"], d.get("tensorop")
        lay_s = "NHWC" if lay == "channels_last" else "NCHW" if len(shape) == 4 else "(N,C)"
        wall = f"{n['wall_us']:.0f} / {t['wall_us']:.0f}" if "wall_us" in t else ""
        out.append(f"| {'x'.join(map(str, shape))} | {dt} | {lay_s} | {p} | {t['copy_floor_us']:.1f} | {n['us']:.1f} "
                   f"| {t['us']:.1f} | {t['ratio_to_native']:.2f} | {t['pct_copy']:.0f} | {n['pct_copy']:.0f} "
                   f"| {to['us']:.1f} | {to['ratio_to_native']:.2f} | {wall} |" if to else
                   f"| {'x'.join(map(str, shape))} | {dt} | {lay_s} | {p} | {t['copy_floor_us']:.1f} | {n['us']:.1f} "
                   f"| {t['us']:.1f} | {t['ratio_to_native']:.2f} | {t['pct_copy']:.0f} | {n['pct_copy']:.0f} | | | {wall} |")
    out += ["", "Targets: `" + json.dumps(result.get("targets", {})) + "`", ""]
    return "\n".join(out)


def summarize_targets(rows):
    """The issue's targets, checked on the triton rows."""
    tri = [r for r in rows if r["impl"] == "triton"]
    fb = [r for r in tri if r["pass"] == "fwdbwd"]
    large = [r for r in tri if r["x_bytes"] >= LARGE_BYTES]
    worst = max(tri, key=lambda r: r["ratio_to_native"])
    return {
        "fwdbwd_at_least_as_fast_as_native": all(r["ratio_to_native"] <= 1.0 for r in fb),
        "fwdbwd_slower_than_native": [(r["shape"], r["dtype"], r["layout"], r["ratio_to_native"]) for r in fb
                                      if r["ratio_to_native"] > 1.0],
        "min_pct_copy_large": min((r["pct_copy"] for r in large), default=None),
        "large_below_70pct": [(r["shape"], r["dtype"], r["layout"], r["pass"], r["pct_copy"]) for r in large
                              if r["pct_copy"] < 70],
        "worst_ratio": (worst["shape"], worst["dtype"], worst["layout"], worst["pass"], worst["ratio_to_native"]),
        "none_slower_than_1.2x": all(r["ratio_to_native"] <= 1.2 for r in tri),
    }


# --- compile ahead in parallel processes (Triton's disk cache is shared) ---

def _warm_worker(jobs):
    torch.cuda.init()
    for shape, dtype_name, layout, config in jobs:
        case = make_case(shape, DTYPES[dtype_name], layout)
        if case is None:
            continue
        x, dy, w, b, rm, rv = case
        bn = lambda *a, **k: tk.batch_norm(*a, config=config, **k)  # noqa: E731
        for fn in pass_fns(bn, x, dy, w, b, rm, rv).values():
            fn()
        torch.cuda.synchronize()
    return len(jobs)


def precompile(jobs, n_proc):
    if n_proc <= 1 or not jobs:
        return
    t0 = time.time()
    chunks = [jobs[i::n_proc] for i in range(n_proc)]
    with mp.get_context("spawn").Pool(n_proc) as pool:
        pool.map(_warm_worker, chunks)
    print(f"# compiled {len(jobs)} cases in {n_proc} processes in {time.time() - t0:.0f} s", flush=True)


def sweep_configs(shape, layout):
    """The SWEEP entries that mean something for this case (index, config)."""
    cf = len(shape) > 2 and layout == "contiguous"  # the contiguous view, one channel per program
    out = []
    for i, cfg in enumerate(SWEEP):
        if "block_c" in cfg and cf:
            continue  # block_c only matters for channels-last / (N, C)
        if "n_split" in cfg and not cf:
            continue  # one split leaves C / block_c programs: far too few there
        out.append((i, cfg))
    return out


PROFILE_CASES = [
    ((64, 256, 14, 14), "float32", "contiguous"),
    ((64, 512, 7, 7), "float32", "contiguous"),
    ((64, 1024, 14, 14), "float32", "contiguous"),
    ((64, 64, 56, 56), "float32", "channels_last"),
    ((64, 64, 112, 112), "float32", "channels_last"),
    ((4096, 1024), "float32", "contiguous"),
]


def profile_kernels(cases, configs, iters=10, activity="CUDA"):
    """Per-kernel GPU time (us per call) of fwdbwd and eval, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    for shape, dt, layout in cases:
        x, dy, w, b, rm, rv = make_case(shape, DTYPES[dt], layout)
        impls = {"native": F.batch_norm}
        for name, cfg in configs.items():
            impls[name] = (lambda c: lambda *a, **k: tk.batch_norm(*a, config=c, **k))(cfg)
        for name, bn in impls.items():
            for p, fn in pass_fns(bn, x, dy, w, b, rm, rv).items():
                if p == "fwd":
                    continue
                fn()
                fn()
                torch.cuda.synchronize()
                with profile(activities=[getattr(ProfilerActivity, activity)]) as prof:
                    for _ in range(iters):
                        flush_l2()
                        torch.cuda._sleep(4_000_000)
                        fn()
                    torch.cuda.synchronize()
                parts = []
                total = 0.0
                for evt in prof.key_averages():
                    if activity == "CUDA":
                        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
                    else:
                        t = evt.self_cpu_time_total
                    if t <= 0 or "flush" in evt.key or "sleep" in evt.key.lower():
                        continue
                    total += t / iters
                    parts.append((t / iters, evt.key[-40:], evt.count // iters))
                print(f"# profile {'x'.join(map(str, shape)):>14} {dt[:4]} {layout[:6]} {name:>8} {p:>6} "
                      f"sum {total:6.1f} | " + " ".join(f"{k}={t:.1f}x{n}" for t, k, n in sorted(parts, reverse=True)[:8]),
                      flush=True)


def sweep(shapes, dtypes, layouts, rounds, deadline):
    """Time fwdbwd (and fwd, eval) of every SWEEP config; returns rows and the best config per case."""
    out = []
    for shape in shapes:
        for dt in dtypes:
            for layout in layouts:
                if time.time() > deadline:
                    print("# sweep: out of time", flush=True)
                    return out
                case = make_case(shape, DTYPES[dt], layout)
                if case is None:
                    continue
                x, dy, w, b, rm, rv = case
                fns = {}
                for p, fn in pass_fns(F.batch_norm, x, dy, w, b, rm, rv).items():
                    fns[("native", p)] = fn
                for i, cfg in sweep_configs(shape, layout):
                    bn = (lambda c: lambda *a, **k: tk.batch_norm(*a, config=c, **k))(cfg)
                    for p, fn in pass_fns(bn, x, dy, w, b, rm, rv).items():
                        fns[(i, p)] = fn
                t = time_interleaved(fns, rounds)
                res = {"shape": list(shape), "dtype": dt, "layout": layout,
                       "native": {p: round(t[("native", p)], 2) for p in PASSES}, "configs": []}
                for i, cfg in enumerate(SWEEP):
                    if (i, "fwd") in t:
                        res["configs"].append({"config": cfg, **{p: round(t[(i, p)], 2) for p in PASSES}})
                best = min(res["configs"], key=lambda c: c["fwdbwd"])
                res["best"] = best
                print(f"# sweep {'x'.join(map(str, shape)):>16} {dt:>8} {layout:>13}: native fwdbwd "
                      f"{res['native']['fwdbwd']:8.1f} | default {res['configs'][0]['fwdbwd']:8.1f} | best "
                      f"{best['fwdbwd']:8.1f} {best['config']} | fwd nat {res['native']['fwd']:.1f} "
                      f"best {min(c['fwd'] for c in res['configs']):.1f} | eval nat {res['native']['eval']:.1f} "
                      f"best {min(c['eval'] for c in res['configs']):.1f}", flush=True)
                out.append(res)
    return out



def _commit():
    """The commit measured, so that a results file says which kernels it timed:
    ``BNLIB_COMMIT`` (the device machine gets a copy of the working tree
    without .git; gpu_check.sh's caller passes it), else git's, else None."""
    if os.environ.get("BNLIB_COMMIT"):
        return os.environ["BNLIB_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layouts", default="contiguous,channels_last")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="time the SWEEP configurations instead of the table")
    ap.add_argument("--sweep-seconds", type=float, default=300)
    ap.add_argument("--sweep-layouts", default="contiguous")
    ap.add_argument("--jobs", type=int, default=12, help="processes that compile the kernels ahead")
    ap.add_argument("--wall", action="store_true", help="also host-inclusive time per fwdbwd call")
    ap.add_argument("--quick", action="store_true", help="three shapes, few rounds")
    ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES")
    ap.add_argument("--sweep-configs", default=None, help="comma-separated indices into SWEEP")
    ap.add_argument("--config", default=None, help="JSON overrides of triton_kernels.CONFIG")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of a few cases (torch.profiler)")
    ap.add_argument("--markdown", default=None, metavar="JSON", help="print a results file as a Markdown table and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return

    if args.config:
        tk.CONFIG.update(json.loads(args.config))
    shapes = [SHAPES[0], SHAPES[7], SHAPES[9]] if args.quick else SHAPES
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.sweep_configs:
        keep = [SWEEP[int(i)] for i in args.sweep_configs.split(",")]
        SWEEP[:] = keep
    rounds = 10 if args.quick else args.rounds
    dtypes = args.dtypes.split(",")
    layouts = args.layouts.split(",")
    props = torch.cuda.get_device_properties(0)

    meta = {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "config": dict(tk.CONFIG),
        "small_channels_last": {"below_elements": tk.SMALL_CHANNELS_LAST_ELEMENTS, **tk.SMALL_CHANNELS_LAST},
        "timing": "median GPU time (CUDA events) over interleaved rounds, L2 flushed (clean: 256 MB read) before each call, "
                  "host queued ahead (torch.cuda._sleep) so launch overhead is excluded",
        "rounds": rounds,
        "bytes": "fwd 3|x| (2|x| if |x| <= L2/2); fwdbwd fwd + 5|x| (3|x| if 2|x| <= L2/2); eval 2|x|",
        "pct_copy": "100 * (bytes / copy bandwidth) / time; copy = torch.empty_like(x).copy_(x), 2|x| bytes",
    }
    print("#", json.dumps(meta), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.profile:
        profile_kernels(PROFILE_CASES, {"triton": {}})
        return

    if args.sweep:
        sweep_layouts = args.sweep_layouts.split(",")
        jobs = [(s, d, l, c) for s in shapes for d in dtypes for l in sweep_layouts for _, c in sweep_configs(s, l)]
        precompile(jobs, args.jobs)
        res = sweep(shapes, dtypes, sweep_layouts, rounds, time.time() + args.sweep_seconds)
        (out_dir / "sweep.json").write_text(json.dumps({"meta": meta, "sweep": res, "configs": SWEEP}, indent=1))
        return

    precompile([(s, d, l, None) for s in shapes for d in dtypes for l in layouts], args.jobs)
    tensorop = tensorop_batch_norm()
    rows = []
    for shape in shapes:
        for dt in dtypes:
            for layout in layouts:
                new = bench_case(shape, dt, layout, rounds, meta["l2_bytes"], tensorop, args.wall)
                rows += new
                if new:
                    print_table(new)
                    sys.stdout.flush()
    print()
    print_table(rows)
    targets = summarize_targets(rows)
    print("# targets:", json.dumps(targets))
    result = {"meta": meta, "targets": targets, "rows": rows}
    (out_dir / "gpu_bench.json").write_text(json.dumps(result, indent=1))
    (out_dir / "gpu_bench.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
