"""bnlib.triton_kernels' own host work per call, with Triton's launches taken out.

On a GPU, a call of the Triton path costs the host three things: bnlib's
Python (checks, layout, launch configuration, allocations, the autograd
node), Triton's launcher (binding the arguments, finding the compiled
kernel) and the driver's launch. For small inputs their sum, not the GPU's
work, sets the time of a step (``bench/results/gpu_h100.md``, column
``wall``). The first of the three can be measured on any machine: replace
each kernel with a stub whose launch does nothing and time the calls on tiny
CPU tensors, where allocation is free. torch's native CPU op on the same
tensors is printed beside it as a yardstick (it includes its small amount of
arithmetic).

``--commit REV`` times the ``triton_kernels.py`` of another commit too
(``git show REV:bnlib/triton_kernels.py``), and ``--module LABEL=PATH``
any other version of the file, in the same interleaved rounds. Each
version is labelled with its commit; the checkout's own is labelled with
``HEAD``'s commit, and ``+edits`` when its ``triton_kernels.py`` differs
from it.

The machine this runs on is usually shared: ``--runs N`` repeats the
whole interleaved measurement N times (each run its own warm-up and
rounds) and keeps every run's medians, so that a reader compares versions
by their ratio within a run, over several runs, rather than by absolute
times that move with the machine's load.

Times are the calling thread's CPU time by default (``--clock thread``), which
leaves out the time it waits for a core on a busy machine; ``--clock wall``
gives elapsed time, as the file's first version (commit 0ddd0ee) used.

Usage: python bench/bench_triton_host.py [--commit b19d0fe] [--module before=/tmp/old.py] [--runs 5] [--rounds 9]
[--clock thread] [--out bench/results]
"""

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KERNELS = ["_partial_stats_kernel", "_finalize_stats_kernel", "_normalize_kernel", "_partial_grad_sums_kernel",
           "_finalize_grad_sums_kernel", "_grad_input_kernel"]
SHAPE = (8, 16, 4, 4)  # tiny: what is left is the host's work


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def load_without_launches(path, name):
    """The module at ``path`` (a version of triton_kernels.py), its kernels stubbed, taking CPU tensors."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.triton is None:
        raise SystemExit("bench_triton_host.py needs Triton importable (pip install triton)")
    module._INTERPRET = True  # its CPU-tensor path, as under TRITON_INTERPRET=1
    for kernel in KERNELS:
        setattr(module, kernel, _NoLaunch())
    return module


def calls(batch_norm):
    """The two calls timed: a training step (forward + backward) and eval under no_grad."""
    C = SHAPE[1]
    x = torch.randn(SHAPE, requires_grad=True)
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    dy = torch.randn(SHAPE)

    def train():
        batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5).backward(dy)

    def evaluate():
        with torch.no_grad():
            batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)

    return {"train fwd+bwd": train, "eval (no_grad)": evaluate}


def git(*args):
    """Output of a git command in the checkout (stripped), or None without git."""
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def checkout_label():
    """The checkout's commit, with ``+edits`` when its triton_kernels.py is not the committed one."""
    head = git("rev-parse", "--short", "HEAD")
    if head is None:
        return "bnlib"
    edited = git("status", "--porcelain", "--", "bnlib/triton_kernels.py")
    return head + ("+edits" if edited else "")


CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def measure(fns, rounds, n_calls, clock=time.thread_time):
    """Median microseconds per call of each fn, over interleaved rounds (after a warm-up).

    The default clock counts this thread's CPU time only: on a shared machine
    the time the thread waits for a core is left out (everything here runs on
    one thread)."""
    for fn in fns.values():
        for _ in range(100):
            fn()
    times = {key: [] for key in fns}
    for _ in range(rounds):  # interleaved: every version sees the same machine state
        for key, fn in fns.items():
            t0 = clock()
            for _ in range(n_calls):
                fn()
            times[key].append(1e6 * (clock() - t0) / n_calls)
    return {key: statistics.median(t) for key, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", action="append", default=[], metavar="REV",
                        help="also time this commit's bnlib/triton_kernels.py (git show)")
    parser.add_argument("--module", action="append", default=[], metavar="LABEL=PATH",
                        help="also time this version of triton_kernels.py")
    parser.add_argument("--runs", type=int, default=1, help="independent interleaved measurements")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=500, help="calls per round")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread",
                        help="thread: this thread's CPU time (default); wall: elapsed time")
    parser.add_argument("--out", default=None, help="write triton_host_cpu.json and .md to this folder")
    args = parser.parse_args()
    torch.set_num_threads(1)

    here = Path(__file__).resolve().parent.parent / "bnlib" / "triton_kernels.py"
    label = checkout_label()
    versions = {label: "bnlib/triton_kernels.py (this checkout)"}
    paths = {label: str(here)}
    tmp = tempfile.TemporaryDirectory()
    for rev in args.commit:
        source = git("show", f"{rev}:bnlib/triton_kernels.py")
        if source is None:
            raise SystemExit(f"git show {rev}:bnlib/triton_kernels.py failed")
        rev_label = git("rev-parse", "--short", rev) or rev
        path = Path(tmp.name) / f"triton_kernels_{rev_label}.py"
        path.write_text(source + "\n")
        versions[rev_label] = f"git show {rev_label}:bnlib/triton_kernels.py"
        paths[rev_label] = str(path)
    for item in args.module:
        mod_label, _, path = item.partition("=")
        versions[mod_label] = paths[mod_label] = path
    fns = {}
    for i, (mod_label, path) in enumerate(paths.items()):
        module = load_without_launches(path, f"_triton_kernels_{i}")
        for case, fn in calls(module.batch_norm).items():
            fns[(mod_label, case)] = fn
    native = "torch native (CPU op)"
    for case, fn in calls(torch.nn.functional.batch_norm).items():
        fns[(native, case)] = fn

    runs = [measure(fns, args.rounds, args.calls, CLOCKS[args.clock]) for _ in range(args.runs)]

    labels = list(dict.fromkeys(v for v, _ in fns))
    cases = list(dict.fromkeys(case for _, case in fns))
    header = "| run | case | " + " | ".join(labels) + " |"
    lines = [header, "|---|---|" + "---:|" * len(labels)]
    for i, us in enumerate(runs):
        lines += [f"| {i + 1} | {case} | " + " | ".join(f"{us[(v, case)]:.1f}" for v in labels) + " |"
                  for case in cases]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": module.triton.__version__,
            "shape": list(SHAPE), "clock": args.clock, "runs": args.runs, "rounds": args.rounds, "calls": args.calls,
            "versions": versions}
    print(f"bnlib.triton_kernels' host work per call (us), launches stubbed out, {SHAPE} float32 CPU tensors, "
          f"1 thread, {args.clock} clock, median of {args.rounds} interleaved rounds of {args.calls} calls, {args.runs} run(s)")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"run": i + 1, "version": v, "case": case, "us": round(us[(v, case)], 2)}
                for i, us in enumerate(runs) for v, case in fns]
        (out / "triton_host_cpu.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        (out / "triton_host_cpu.md").write_text(
            "# bnlib.triton_kernels' host work per call, Triton's launches stubbed out\n\n"
            f"`bench/bench_triton_host.py`, {meta['date']}, torch {meta['torch']}, Triton {meta['triton']}, "
            f"Python {meta['python']}, on the development machine (CPU, 1 thread, {args.clock} clock; on a shared machine "
            f"compare versions within a run). Input {tuple(SHAPE)} float32; per run, the median of "
            f"{args.rounds} interleaved rounds of {args.calls} calls; {args.runs} run(s). Versions: "
            + ", ".join(f"`{k}` = {v}" for k, v in versions.items()) + ".\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {out / 'triton_host_cpu.json'} and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
