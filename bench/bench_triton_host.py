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

``--module LABEL=PATH`` times another version of ``triton_kernels.py`` too
(e.g. an older commit's, saved with ``git show``), in the same interleaved
rounds.

Usage: python bench/bench_triton_host.py [--module before=/tmp/old.py] [--rounds 9] [--out bench/results]
"""

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import sys
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", default=[], metavar="LABEL=PATH",
                        help="also time this version of triton_kernels.py")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=500, help="calls per round")
    parser.add_argument("--out", default=None, help="write triton_host_cpu.json and .md to this folder")
    args = parser.parse_args()
    torch.set_num_threads(1)

    here = Path(__file__).resolve().parent.parent / "bnlib" / "triton_kernels.py"
    versions = {"bnlib": "bnlib/triton_kernels.py (this checkout)"}
    paths = {"bnlib": str(here)}
    for item in args.module:
        label, _, path = item.partition("=")
        versions[label] = paths[label] = path
    fns = {}
    for i, (label, path) in enumerate(paths.items()):
        module = load_without_launches(path, f"_triton_kernels_{i}")
        for case, fn in calls(module.batch_norm).items():
            fns[(label, case)] = fn
    for case, fn in calls(torch.nn.functional.batch_norm).items():
        fns[("torch native (CPU op)", case)] = fn

    for fn in fns.values():  # warm-up
        for _ in range(100):
            fn()
    times = {key: [] for key in fns}
    for _ in range(args.rounds):  # interleaved: every version sees the same machine state
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[key].append(1e6 * (time.perf_counter() - t0) / args.calls)
    us = {key: statistics.median(t) for key, t in times.items()}

    labels = list(dict.fromkeys(label for label, _ in fns))
    cases = list(dict.fromkeys(case for _, case in fns))
    lines = ["| per call (us) | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {case} | " + " | ".join(f"{us[(label, case)]:.1f}" for label in labels) + " |" for case in cases]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "shape": list(SHAPE), "rounds": args.rounds, "calls": args.calls,
            "versions": versions}
    print(f"bnlib.triton_kernels' host work per call, launches stubbed out, {SHAPE} float32 CPU tensors, "
          f"1 thread, median of {args.rounds} interleaved rounds of {args.calls} calls")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"version": label, "case": case, "us": round(us[(label, case)], 2)} for label, case in fns]
        (out / "triton_host_cpu.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        (out / "triton_host_cpu.md").write_text(
            "# bnlib.triton_kernels' host work per call, Triton's launches stubbed out\n\n"
            f"`bench/bench_triton_host.py`, {meta['date']}, torch {meta['torch']}, Python {meta['python']}, "
            f"on the development machine (CPU, 1 thread). Input {tuple(SHAPE)} float32; median of "
            f"{args.rounds} interleaved rounds of {args.calls} calls. Versions: "
            + ", ".join(f"`{k}` = {v}" for k, v in versions.items()) + ".\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {out / 'triton_host_cpu.json'} and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
