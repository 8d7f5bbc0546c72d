"""Time bnlib's SyncBatchNorm against local BatchNorm2d on CPU processes (gloo).

For each per-process input shape ``(N, C, H, W)`` and each number of
processes: forward + backward of ``bnlib.nn.BatchNorm2d`` (no communication)
and of ``bnlib.nn.SyncBatchNorm`` (one all_gather forward, one all_reduce
backward), in training mode, interleaved round after round in the same
processes; the fastest round, measured on rank 0. One launch of
the largest number of processes serves every group size: ranks
``0 .. g-1`` form the group, the others wait.

Absolute times on a shared machine are noisy and, with more processes than
cores, include waiting to be scheduled; the ratio sync/local is the number
to read. NCCL on GPUs is not measured here.

Usage: python bench/bench_sync.py [--processes 2 4] [--rounds 7] [--reps 5] [--quick]
"""

import argparse
import time

import torch

from bnlib.distributed_demo import launch, time_bn_worker
from bnlib.sync_batchnorm import sync_cost

SHAPES = [(8, 16, 8, 8), (32, 64, 16, 16), (16, 256, 14, 14)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the two smaller shapes, 3 rounds")
    args = parser.parse_args()
    shapes = SHAPES[:2] if args.quick else SHAPES
    rounds = 3 if args.quick else args.rounds
    world = max(args.processes)

    start = time.perf_counter()
    timings = launch(time_bn_worker, world, shapes, rounds, args.reps, sorted(args.processes))[0]
    print(f"SyncBatchNorm vs local BatchNorm2d, forward + backward, CPU (gloo on 127.0.0.1), "
          f"torch {torch.__version__}, 1 thread per process, fastest of {rounds} rounds x {args.reps}")
    print(f"{'processes':>9s}  {'input per process':<20s}{'local ms':>10s}{'sync ms':>10s}{'sync/local':>12s}"
          f"{'bytes fwd/bwd per rank':>25s}")
    for (g, shape), (local, sync) in sorted(timings.items()):
        cost = sync_cost(shape[1], g)
        traffic = f"{cost['forward_sent'] + cost['forward_received']}/{cost['backward_payload']}"
        print(f"{g:>9d}  {str(tuple(shape)):<20s}{local * 1e3:>10.3f}{sync * 1e3:>10.3f}{sync / local:>12.1f}"
              f"{traffic:>25s}")
    print(f"(wall time {time.perf_counter() - start:.0f} s, including starting {world} processes)")


if __name__ == "__main__":
    main()
