r"""Data-parallel training with SyncBatchNorm on CPU processes, for the chapter
"Batch norm across devices".

Everything runs on one machine: ``P`` processes started with
``torch.multiprocessing`` (forkserver), joined in a gloo process group over
127.0.0.1, one thread each. What a process runs must live in an importable
module, not in a notebook, hence this file. No process prints: results come
back to the caller (:func:`launch`), which prints them, so a notebook shows
them and every number is the same on every run.

Data parallelism in one line: rank ``r`` of ``P`` takes rows
``[r*b, (r+1)*b)`` of every global mini-batch of ``B = P*b`` rows, computes
the mean loss over its ``b`` rows, and ``DistributedDataParallel`` averages
the gradients over the ranks, which is the gradient of the mean loss over
all ``B`` rows, as long as every layer computes per sample. BatchNorm does
not: it couples the rows of a batch. With plain BN each rank normalizes its
``b`` rows on their own (small-batch BN); with ``SyncBatchNorm`` all ``B``
rows share the statistics, and ``P`` processes train exactly like one
process on the whole batch.

Run ``python -m bnlib.distributed_demo`` for the chapter's demo.
"""

import os
import statistics
import tempfile
import time
from collections import OrderedDict
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import bnlib.nn as bnn
from bnlib.data import load_digits_split

__all__ = [
    "launch",
    "make_cnn",
    "digits_images",
    "train_digits",
    "sync_digits_worker",
    "ddp_demo_worker",
    "run_ddp_demo",
    "time_bn_worker",
]


# --------------------------------------------------------------------------
# Starting processes
# --------------------------------------------------------------------------

_TIMEOUT = timedelta(seconds=120)

# What the fork server imports once, before it forks any process: torch,
# torch._dynamo (which DistributedDataParallel imports when it is first
# constructed), scikit-learn's datasets (bnlib.data's digits) and this
# module. Spawned processes imported all of it again, each, about 4 s of
# CPU per process and launch (most of a chapter 8 launch of 4 processes on
# 2 cores); forked ones start with it. CUDA is not initialized by these
# imports, so the nccl processes may still initialize it after the fork.
_FORKSERVER_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "sklearn.datasets", __name__]


def _entry(rank, fn, world_size, port, out_dir, backend, args):
    """What each started process runs: join the group, call ``fn``, save its result."""
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # A client of the rendezvous store that launch() holds open on ``port``.
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=_TIMEOUT)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()  # nobody leaves while another rank may still need it
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def launch(fn, world_size, *args, backend="gloo"):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes; return their results.

    ``fn`` must be a module-level function of an importable module (the
    forkserver start method, like spawn, pickles it by name). The
    processes are forked by a fork server that this process starts on its
    first launch and that has imported torch and bnlib once
    (``_FORKSERVER_PRELOAD``), not started as fresh interpreters. Each
    process gets one thread and a process group that meets at a store this
    process holds on 127.0.0.1: gloo, or ``backend="nccl"`` with rank ``r``
    on GPU ``r``. Results travel through files (any
    size, no pipe to fill) and come back as a list in rank order. An
    exception in any process is raised here, and the others are stopped.
    """
    # The rendezvous store lives here, on a port the OS picks as it binds
    # (port 0), open until the processes are done. Picking a free port,
    # closing it and having rank 0 bind it a second later raced with every
    # other process on the machine: a notebook kernel starting beside the
    # book's chapter 8 once took the port in between (EADDRINUSE).
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="bnlib-launch-") as out_dir:
        mp.get_context("forkserver").set_forkserver_preload(_FORKSERVER_PRELOAD)  # (once it runs, a no-op)
        mp.start_processes(_entry, args=(fn, world_size, store.port, out_dir, backend, args), nprocs=world_size,
                           join=True, start_method="forkserver")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# --------------------------------------------------------------------------
# The chapter's model and data
# --------------------------------------------------------------------------

def _norm(kind, num_features, dims, running_stats):
    if kind == "bn":
        return (bnn.BatchNorm1d if dims == 1 else bnn.BatchNorm2d)(num_features)
    if kind == "torch":
        return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features)
    if isinstance(kind, int) and not isinstance(kind, bool):
        return bnn.GhostBatchNorm(num_features, kind, running_stats=running_stats)
    raise ValueError(f"norm must be 'bn', 'torch' or a virtual batch size (int), got {kind!r}")


def make_cnn(norm="bn", seed=0, running_stats="first"):
    """A small CNN for 8x8 digits: input ``(N, 1, 8, 8)``, output ``(N, 10)`` logits::

        conv1 (1->8, 3x3) - norm1 - relu - pool (8x8 -> 4x4)
        conv2 (8->16, 3x3) - norm2 - relu - pool (4x4 -> 2x2) - flatten (64)
        fc (64->32) - norm3 (BatchNorm1d: m values per channel = batch size) - relu - out (32->10)

    ``norm``: ``"bn"`` (bnlib.nn.BatchNorm*d), ``"torch"`` (torch.nn.BatchNorm*d)
    or an int ``b``: per-device batches of ``b`` rows, as DDP with local BN
    has them, simulated in one process by ``bnlib.nn.GhostBatchNorm(C, b,
    running_stats=running_stats)``. ``"first"`` (the default) keeps the running
    estimates of each batch's first ``b`` rows, the ones DDP ends with (it
    broadcasts rank 0's buffers); ``"pooled"`` pools every slice's.
    Parameters are drawn from ``seed`` without touching the global generator.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, 8, 3, padding=1, bias=False)),
            ("norm1", _norm(norm, 8, 2, running_stats)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(8, 16, 3, padding=1, bias=False)),
            ("norm2", _norm(norm, 16, 2, running_stats)),
            ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(64, 32, bias=False)),
            ("norm3", _norm(norm, 32, 1, running_stats)),
            ("relu3", nn.ReLU()),
            ("out", nn.Linear(32, 10)),
        ]))


def digits_images(dtype=torch.float32):
    """scikit-learn's digits as images: ``(x_train, y_train, x_test, y_test)``,
    ``x`` of shape ``(n, 1, 8, 8)`` (standardized per pixel with the training
    split's statistics), 1347 training and 450 test images."""
    split = load_digits_split(seed=0, dtype=dtype)
    return (split.x_train.view(-1, 1, 8, 8), split.y_train, split.x_test.view(-1, 1, 8, 8), split.y_test)


def train_digits(model, data, seed=0, epochs=2, batch_size=32, lr=0.05, rank=0, world_size=1, history=None):
    """SGD (momentum 0.9) on the digits; return the test accuracy (eval mode).

    Every epoch draws a permutation from ``seed`` and cuts it into global
    batches of ``batch_size`` (the last, short one is dropped). With
    ``world_size > 1`` this rank takes its ``batch_size // world_size`` rows
    of each global batch and ``model`` should be wrapped in
    ``DistributedDataParallel``; the loss is the mean over the rank's rows.
    ``history``, a list, receives the loss of every step.
    """
    x_train, y_train, x_test, y_test = data
    per_rank = batch_size // world_size
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[start + rank * per_rank: start + (rank + 1) * per_rank]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            if history is not None:
                history.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    model.train()
    return accuracy


def sync_digits_worker(rank, world_size, seeds, epochs, batch_size, lr):
    """One rank of the accuracy experiment: SyncBN + DDP, one run per seed.

    The model is ``make_cnn("bn", seed)`` converted with
    ``SyncBatchNorm.convert_sync_batchnorm``. Returns the test accuracies
    (evaluated on rank 0: eval mode needs no synchronization), else None.
    """
    data = digits_images()
    accuracies = []
    for seed in seeds:
        model = bnn.SyncBatchNorm.convert_sync_batchnorm(make_cnn("bn", seed))
        ddp = nn.parallel.DistributedDataParallel(model)
        accuracies.append(train_digits(ddp, data, seed, epochs, batch_size, lr, rank, world_size))
    return accuracies if rank == 0 else None


# --------------------------------------------------------------------------
# The DDP demo
# --------------------------------------------------------------------------

def ddp_demo_worker(rank, world_size, steps, batch_size, lr):
    """``steps`` DDP steps on the first ``steps * batch_size`` training digits,
    twice: with the model's BatchNorms as they are (each rank normalizes its
    own rows) and converted to SyncBatchNorm. Returns, per variant, this
    rank's losses (mean over its rows) and final state dict."""
    x_train, y_train, _, _ = digits_images()
    per_rank = batch_size // world_size
    out = {}
    for name in ("local BN", "SyncBN"):
        model = make_cnn("bn", seed=0)
        if name == "SyncBN":
            model = bnn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=lr)
        losses = []
        for step in range(steps):
            first = step * batch_size + rank * per_rank
            rows = slice(first, first + per_rank)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(x_train[rows]), y_train[rows])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        out[name] = {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    return out


def _train_one_process(norm, steps, batch_size, lr):
    """The demo's steps in this process: ``norm="torch"`` (torch.nn.BatchNorm on
    the whole batch, the truth for SyncBN) or a virtual batch size (ghost BN,
    what DDP with local BN should equal)."""
    x_train, y_train, _, _ = digits_images()
    model = make_cnn(norm, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        rows = slice(step * batch_size, (step + 1) * batch_size)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def _max_difference(state_a, state_b):
    return max(float((state_a[k].double() - state_b[k].double()).abs().max()) for k in state_b)


def run_ddp_demo(world_size=2, steps=5, batch_size=32, lr=0.1):
    """Train the CNN with DDP on ``world_size`` processes, with local BN and with
    SyncBN, and with BN on the whole batch in this process; print the losses
    and how far each DDP run ends from the whole-batch one.

    Also trains ghost BN with virtual batches of ``batch_size // world_size``
    rows in this process (``make_cnn(b)``: running estimates from the first
    slice) and compares rank 0's local-BN model with it.

    Returns ``{"whole": losses, "local BN": (losses, max_diff), "SyncBN": (losses, max_diff),
    "local BN vs ghost BN": max_diff}``, where ``losses`` are whole-batch mean
    losses per step (for DDP, the mean of the ranks' losses, which is the same
    thing for equal slices) and ``max_diff`` is the largest difference of any
    parameter or buffer from the whole-batch run (from the ghost-BN run for
    the last key) after the last step.
    """
    per_rank = batch_size // world_size
    whole_losses, whole_state = _train_one_process("torch", steps, batch_size, lr)
    _, ghost_state = _train_one_process(per_rank, steps, batch_size, lr)
    ranks = launch(ddp_demo_worker, world_size, steps, batch_size, lr)
    results = {"whole": whole_losses}
    for name in ("local BN", "SyncBN"):
        losses = [statistics.fmean(r[name]["losses"][s] for r in ranks) for s in range(steps)]
        results[name] = (losses, _max_difference(ranks[0][name]["state"], whole_state))
    results["local BN vs ghost BN"] = _max_difference(ranks[0]["local BN"]["state"], ghost_state)
    print(f"DDP on {world_size} processes (gloo): global batch {batch_size} = "
          f"{world_size} x {batch_size // world_size}, {steps} SGD steps, lr {lr}")
    print(f"{'loss at step':<14s}" + "".join(f"{s + 1:>8d}" for s in range(steps)))
    print(f"{'whole batch':<14s}" + "".join(f"{v:8.4f}" for v in whole_losses))
    for name in ("local BN", "SyncBN"):
        print(f"{name:<14s}" + "".join(f"{v:8.4f}" for v in results[name][0]))
    for name, diff, other in [("local BN", results["local BN"][1], "whole batch"),
                              ("SyncBN", results["SyncBN"][1], "whole batch"),
                              ("local BN", results["local BN vs ghost BN"],
                               f"ghost BN of {per_rank} rows, 1 process")]:
        verdict = "below 1e-5" if diff < 1e-5 else "above 1e-2" if diff > 1e-2 else f"{diff:.0e}"
        print(f"{name}: max |parameter or buffer - {other}|\n  after step {steps}: {verdict}")
    return results


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

def time_bn_worker(rank, world_size, shapes, rounds=7, reps=5, group_sizes=None):
    """Seconds per forward+backward of BatchNorm2d (local) and SyncBatchNorm.

    For every per-rank input shape ``(N, C, H, W)`` and every group size in
    ``group_sizes`` (default: ``[world_size]``; the ranks ``0 .. g-1`` form
    the group, the others wait): ``rounds`` rounds of ``reps`` steps each,
    local and sync interleaved; the fastest round, on rank 0. (The fastest,
    not the median: a busy machine only ever adds time, and with more
    processes than cores a burst of load can slow most rounds of one of
    the two layers, and their medians then misorder them.)
    Returns ``{(g, shape): (local_seconds, sync_seconds)}`` on rank 0, else None.
    """
    group_sizes = group_sizes or [world_size]
    groups = {g: (dist.new_group(list(range(g))) if g < world_size else None) for g in group_sizes}
    out = {}
    for g in group_sizes:
        for shape in shapes:
            if rank < g:
                out[(g, tuple(shape))] = _time_one(shape, groups[g], rounds, reps)
            dist.barrier()
    return out if rank == 0 else None


def _time_one(shape, group, rounds, reps):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    local = bnn.BatchNorm2d(shape[1])
    sync = bnn.SyncBatchNorm(shape[1], process_group=group)

    def step(module):
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    times = {"local": [], "sync": []}
    step(local), step(sync)  # warm-up
    for _ in range(rounds):
        for name, module in (("local", local), ("sync", sync)):
            start = time.perf_counter()
            for _ in range(reps):
                step(module)
            times[name].append((time.perf_counter() - start) / reps)
    return min(times["local"]), min(times["sync"])


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_ddp_demo()
