"""Time bnlib against torch's native batch norm on this CPU.

For each shape: forward and forward+backward of ``bnlib.nn.BatchNorm*d``,
``torch.nn.BatchNorm*d`` (native) and the NumPy reference, in training mode.
The three run interleaved, round after round, in the same process, so the
ratios compare like with like; absolute times on a shared machine are noisy,
ratios much less so. The median of the rounds is reported.

With ``--threads 1 2`` the table has one row set per thread count. The
thread clock counts one thread's CPU time only, so row sets with more than
one thread are timed on the wall clock whatever ``--clock`` says.

Usage: python bench/bench_batchnorm.py [--threads 1 2] [--clock thread] [--rounds 15] [--quick]
"""

import argparse
import statistics
import time

import numpy as np
import torch

import bnlib.nn as bnn
from bnlib import reference

SHAPES = [(256, 1024), (4096, 1024), (64, 64, 32, 32), (128, 256, 14, 14)]


def module_pair(shape):
    cls = {2: (bnn.BatchNorm1d, torch.nn.BatchNorm1d), 4: (bnn.BatchNorm2d, torch.nn.BatchNorm2d)}[len(shape)]
    return cls[0](shape[1]), cls[1](shape[1])


CLOCK = time.perf_counter


def time_call(fn, reps):
    start = CLOCK()
    for _ in range(reps):
        fn()
    return (CLOCK() - start) / reps


def torch_steps(module, x, dy):
    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    return forward, forward_backward


def numpy_steps(x_np, dy_np):
    layer = reference.BatchNorm(x_np.shape[1])

    def forward():
        layer.forward(x_np)

    def forward_backward():
        layer.forward(x_np)
        layer.backward(dy_np)

    return forward, forward_backward


def bench_shape(shape, rounds, reps):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    ours, native = module_pair(shape)
    candidates = {
        "bnlib.nn": torch_steps(ours, x, dy),
        "torch native": torch_steps(native, x, dy),
        "numpy reference": numpy_steps(x.detach().numpy(), dy.numpy()),
    }
    times = {(name, kind): [] for name in candidates for kind in ("fwd", "fwd+bwd")}
    for name, (fwd, fwdbwd) in candidates.items():  # warm-up
        fwd(), fwdbwd()
    for _ in range(rounds):
        for name, (fwd, fwdbwd) in candidates.items():
            times[(name, "fwd")].append(time_call(fwd, reps))
            times[(name, "fwd+bwd")].append(time_call(fwdbwd, reps))
    return {key: statistics.median(values) for key, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="torch thread counts, one row set each (e.g. --threads 1 2)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke test")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="'thread' counts only this thread's CPU time (steadier on a busy machine, "
                             "meaningful with --threads 1)")
    args = parser.parse_args()
    global CLOCK
    rounds = 3 if args.quick else args.rounds
    print(f"torch {torch.__version__}, numpy {np.__version__}, median of {rounds} interleaved rounds; "
          f"ratio = time / torch native time")
    header = (f"{'threads':<8}{'clock':<7}{'shape':<20}{'pass':<9}{'native ms':>11}{'bnlib ms':>10}"
              f"{'bnlib/native':>14}{'numpy ms':>10}{'numpy/native':>14}")
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        clock = args.clock if threads == 1 else "wall"
        CLOCK = time.thread_time if clock == "thread" else time.perf_counter
        torch.set_num_threads(threads)
        for shape in SHAPES:
            numel = int(np.prod(shape))
            reps = max(1, int(2e7 // numel))
            result = bench_shape(shape, rounds, reps)
            for kind in ("fwd", "fwd+bwd"):
                native = result[("torch native", kind)]
                ours = result[("bnlib.nn", kind)]
                ref = result[("numpy reference", kind)]
                print(f"{threads:<8}{clock:<7}{str(shape):<20}{kind:<9}{native * 1e3:>11.3f}{ours * 1e3:>10.3f}"
                      f"{ours / native:>14.2f}{ref * 1e3:>10.3f}{ref / native:>14.2f}")


if __name__ == "__main__":
    main()
