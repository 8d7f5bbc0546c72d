"""Time bnlib's layer, group, RMS and instance norm against torch's on this CPU.

Forward+backward (and forward alone) of ``bnlib.nn.LayerNorm``, ``GroupNorm``,
``RMSNorm`` and ``InstanceNorm2d`` on their default CPU path (the C++ loops of
``bnlib/csrc/batch_norm_cpu.cpp``, ``grouped_norm_forward/backward``), the
same modules on the tensor-op path, and torch's modules, interleaved round
after round in one process as in ``bench_batchnorm.py``, each round in
another order; the median of the rounds, as time and as ratio to torch's.

Usage: python bench/bench_norms.py [--threads 1 2] [--clock thread] [--rounds 15] [--quick] [--pin-malloc]
"""

import statistics

import torch

import bnlib.nn as bnn
from bench_batchnorm import common_arguments, pin_malloc, repetitions, time_call, torch_steps, use_threads

# (label, bnlib module, torch module, input shape): small inputs, where
# per-call work sets the time; a transformer's rows, a normalized shape of
# three dims, ResNet-sized maps with 32 and 8 groups.
CASES = [
    ("LayerNorm(64)", lambda: bnn.LayerNorm(64), lambda: torch.nn.LayerNorm(64), (32, 64)),
    ("GroupNorm(4, 16)", lambda: bnn.GroupNorm(4, 16), lambda: torch.nn.GroupNorm(4, 16), (8, 16, 8, 8)),
    ("RMSNorm(64)", lambda: bnn.RMSNorm(64), lambda: torch.nn.RMSNorm(64), (32, 64)),
    ("LayerNorm(1024)", lambda: bnn.LayerNorm(1024), lambda: torch.nn.LayerNorm(1024), (4096, 1024)),
    ("LayerNorm([64, 32, 32])", lambda: bnn.LayerNorm([64, 32, 32]), lambda: torch.nn.LayerNorm([64, 32, 32]),
     (32, 64, 32, 32)),
    ("GroupNorm(32, 256)", lambda: bnn.GroupNorm(32, 256), lambda: torch.nn.GroupNorm(32, 256), (64, 256, 14, 14)),
    ("GroupNorm(8, 64)", lambda: bnn.GroupNorm(8, 64), lambda: torch.nn.GroupNorm(8, 64), (64, 64, 32, 32)),
    ("RMSNorm(1024)", lambda: bnn.RMSNorm(1024), lambda: torch.nn.RMSNorm(1024), (4096, 1024)),
    ("InstanceNorm2d(64)", lambda: bnn.InstanceNorm2d(64, affine=True),
     lambda: torch.nn.InstanceNorm2d(64, affine=True), (64, 64, 32, 32)),
    # channels-last inputs (grouped_norm_forward_cl / backward_cl), as a
    # model converted with .to(memory_format=torch.channels_last) feeds them
    ("GroupNorm(32, 256) NHWC", lambda: bnn.GroupNorm(32, 256), lambda: torch.nn.GroupNorm(32, 256),
     (64, 256, 14, 14), torch.channels_last),
    ("GroupNorm(8, 64) NHWC", lambda: bnn.GroupNorm(8, 64), lambda: torch.nn.GroupNorm(8, 64), (64, 64, 32, 32),
     torch.channels_last),
]


def bench_case(make_ours, make_native, shape, rounds, reps, memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=memory_format)
    candidates = {
        "bnlib": torch_steps(make_ours(), x, dy),
        "native": torch_steps(make_native(), x, dy),
        "tensor ops": torch_steps(make_ours(), x, dy, cpu_path="tensor_ops"),
    }
    times = {(name, kind): [] for name in candidates for kind in ("fwd", "fwd+bwd")}
    for fwd, fwdbwd in candidates.values():  # warm-up
        fwd(), fwdbwd()
    names = list(candidates)
    for round_ in range(rounds):
        # Each round starts with another candidate: what ran just before (the
        # tensor-op path frees many large blocks, and glibc's heap then hands
        # the next large allocation fresh pages) moved a ratio by up to 0.3.
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            fwd, fwdbwd = candidates[name]
            times[(name, "fwd")].append(time_call(fwd, reps))
            times[(name, "fwd+bwd")].append(time_call(fwdbwd, reps))
    return {key: statistics.median(values) for key, values in times.items()}


def main():
    args = common_arguments(__doc__.splitlines()[0]).parse_args()
    pin_malloc(args.pin_malloc)
    rounds = 3 if args.quick else args.rounds
    print(f"torch {torch.__version__}; median of {rounds} interleaved rounds; ratio = time / torch's time")
    header = (f"{'threads':<8}{'clock':<7}{'module':<26}{'shape':<19}{'pass':<9}{'torch ms':>9}{'bnlib ms':>9}"
              f"{'bnlib/torch':>12}{'tensor ops/torch':>17}")
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        clock = use_threads(threads, args.clock)
        for label, make_ours, make_native, shape, *memory_format in CASES:
            numel = 1
            for size in shape:
                numel *= size
            result = bench_case(make_ours, make_native, shape, rounds, repetitions(numel), *memory_format)
            for kind in ("fwd", "fwd+bwd"):
                native, ours = result[("native", kind)], result[("bnlib", kind)]
                print(f"{threads:<8}{clock:<7}{label:<26}{str(shape):<19}{kind:<9}{native * 1e3:>9.3f}{ours * 1e3:>9.3f}"
                      f"{ours / native:>12.2f}{result[('tensor ops', kind)] / native:>17.2f}")


if __name__ == "__main__":
    main()
