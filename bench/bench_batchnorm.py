"""Time bnlib against torch's native batch norm on this CPU.

For each shape: training forward and forward+backward of
``bnlib.nn.BatchNorm*d`` (its default CPU path, the fused C++ kernels of
``bnlib.cpu_kernels``), the same module on its tensor-op path,
``torch.nn.BatchNorm*d`` (native), the NumPy reference, and the copy floor
``x.clone()``. All run interleaved, round after round, in the same process,
so the ratios compare like with like; absolute times on a shared machine are
noisy, ratios much less so. The median of the rounds is reported, as time,
ratio to native and percent of the copy floor: the least bytes the pass must
move (forward 2|x|, forward+backward 5|x|) at the copy's bandwidth, over the
time taken (100% = as fast as a copy of those bytes).

With ``--threads 1 2`` the table has one row set per thread count. The
thread clock counts one thread's CPU time only, so row sets with more than
one thread are timed on the wall clock whatever ``--clock`` says.

With ``--pin-malloc`` glibc's allocator is pinned first, in the process
(``bnlib.perf.pin_glibc_malloc``), as the environment variables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` pin it for the
tables of ``bench/results/cpu_dev_machine.md``: a freed tensor's memory is
then reused instead of handed back to the system, and no candidate's time
includes page faults that another's escapes.

Usage: python bench/bench_batchnorm.py [--threads 1 2] [--clock thread] [--rounds 15] [--quick] [--pin-malloc]
"""

import argparse
import statistics
import time

import numpy as np
import torch

import bnlib.functional as BF
import bnlib.nn as bnn
from bnlib import cpu_kernels, perf, reference

# (32, 64) is the book's small batches, where per-call work, not memory, sets the time.
SHAPES = [(32, 64), (256, 1024), (4096, 1024), (64, 64, 32, 32), (128, 256, 14, 14)]
BYTES_PER_PASS = {"fwd": 2, "fwd+bwd": 5}  # the least a pass moves, in units of |x|


def module_pair(shape):
    cls = {2: (bnn.BatchNorm1d, torch.nn.BatchNorm1d), 4: (bnn.BatchNorm2d, torch.nn.BatchNorm2d)}[len(shape)]
    return cls[0](shape[1]), cls[1](shape[1])


CLOCK = time.perf_counter


def repetitions(numel):
    """Calls per timed block: about 2e7 values' worth, at most 1000 (a
    (32, 64) input would otherwise take 10,000 calls a block)."""
    return max(1, min(1000, int(2e7 // numel)))


def time_call(fn, reps):
    start = CLOCK()
    for _ in range(reps):
        fn()
    return (CLOCK() - start) / reps


def torch_steps(module, x, dy, cpu_path=None):
    """Forward and forward+backward of a module; with ``cpu_path``, on that
    path of bnlib.functional (``"tensor_ops"``)."""
    def on_path(fn):
        if cpu_path is None:
            return fn

        def run():
            with BF.cpu_backend(cpu_path):
                fn()
        return run

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    return on_path(forward), on_path(forward_backward)


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
    tensor_ops, _ = module_pair(shape)
    copy = (lambda: x.detach().clone(),) * 2
    candidates = {
        "bnlib": torch_steps(ours, x, dy),
        "native": torch_steps(native, x, dy),
        "tensor ops": torch_steps(tensor_ops, x, dy, cpu_path="tensor_ops"),
        "numpy": numpy_steps(x.detach().numpy(), dy.numpy()),
        "copy": copy,
    }
    times = {(name, kind): [] for name in candidates for kind in ("fwd", "fwd+bwd")}
    for name, (fwd, fwdbwd) in candidates.items():  # warm-up
        fwd(), fwdbwd()
    for _ in range(rounds):
        for name, (fwd, fwdbwd) in candidates.items():
            times[(name, "fwd")].append(time_call(fwd, reps))
            if name != "copy":
                times[(name, "fwd+bwd")].append(time_call(fwdbwd, reps))
    return {key: statistics.median(values) for key, values in times.items() if values}


def common_arguments(description):
    """The options this script and ``bench_norms.py`` share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="torch thread counts, one row set each (e.g. --threads 1 2)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke test")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="'thread' counts only this thread's CPU time (steadier on a busy machine, "
                             "meaningful with --threads 1)")
    parser.add_argument("--pin-malloc", action="store_true",
                        help="pin glibc's allocator first (perf.pin_glibc_malloc), as MALLOC_MMAP_THRESHOLD_ and "
                             "MALLOC_TRIM_THRESHOLD_ do: no candidate then pays for fresh pages that another escapes")
    return parser


def pin_malloc(asked):
    """With ``--pin-malloc``, pin glibc's allocator before anything is timed, and say so."""
    if asked:
        pinned = perf.pin_glibc_malloc()
        print("glibc's allocator pinned (perf.pin_glibc_malloc)" if pinned
              else "--pin-malloc: not glibc (or glibc refused): the allocator is left as it is")


def use_threads(threads, clock):
    """Run torch on ``threads`` threads, timed on ``clock`` (the wall clock
    for more than one thread: the thread clock counts one thread's time);
    returns the clock's name."""
    global CLOCK
    clock = clock if threads == 1 else "wall"
    CLOCK = time.thread_time if clock == "thread" else time.perf_counter
    torch.set_num_threads(threads)
    return clock


def main():
    args = common_arguments(__doc__.splitlines()[0]).parse_args()
    pin_malloc(args.pin_malloc)
    rounds = 3 if args.quick else args.rounds
    kernels = "fused C++ kernels" if cpu_kernels.is_available() else "tensor ops (the C++ kernels could not be built)"
    print(f"torch {torch.__version__}, numpy {np.__version__}; bnlib's CPU path: {kernels}")
    print(f"median of {rounds} interleaved rounds; ratio = time / torch native time; "
          "%floor = the pass's least bytes at the copy's bandwidth, over its time")
    header = (f"{'threads':<8}{'clock':<7}{'shape':<20}{'pass':<9}{'native ms':>10}{'bnlib ms':>10}"
              f"{'bnlib/native':>13}{'%floor nat':>11}{'%floor bnlib':>13}{'tensor ops/nat':>15}{'numpy/nat':>10}")
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        clock = use_threads(threads, args.clock)
        for shape in SHAPES:
            numel = int(np.prod(shape))
            reps = repetitions(numel)
            result = bench_shape(shape, rounds, reps)
            copy_bw = 2 * numel * 4 / result[("copy", "fwd")]  # bytes per second
            for kind in ("fwd", "fwd+bwd"):
                native = result[("native", kind)]
                ours = result[("bnlib", kind)]
                floor = BYTES_PER_PASS[kind] * numel * 4 / copy_bw
                print(f"{threads:<8}{clock:<7}{str(shape):<20}{kind:<9}{native * 1e3:>10.3f}{ours * 1e3:>10.3f}"
                      f"{ours / native:>13.2f}{100 * floor / native:>10.0f}%{100 * floor / ours:>12.0f}%"
                      f"{result[('tensor ops', kind)] / native:>15.2f}{result[('numpy', kind)] / native:>10.2f}")


if __name__ == "__main__":
    main()
