"""bnlib.nn.SyncBatchNorm against torch.nn.BatchNorm*d on the whole batch (the truth).

The contract: ranks holding slices of a batch (equal, unequal or empty)
get the matching slices of the whole-batch output and input gradient; their
parameter gradients sum to the whole-batch ones; running statistics and
num_batches_tracked equal the whole-batch ones on every rank.

Processes are expensive here (each imports torch), so ONE launch of 3
processes (forkserver, gloo on 127.0.0.1) runs every multi-process case: the
3-rank cases use the default (world) group, the 2-rank cases a group of
ranks {0, 1} (which also tests ``process_group``). The processes only run
bnlib and return raw tensors; the comparisons with torch happen here, in
the parent. Tolerances are helpers.py's (OUT_TOL, GRAD_TOL, STAT_TOL, with
their reasons there): merging statistics across ranks changes only the
order of the additions, so the float64 differences stay at a few ulps.
"""

from __future__ import annotations

import copy
import inspect
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import bnlib.functional as BF
import bnlib.nn
from bnlib.distributed_demo import launch
from bnlib.sync_batchnorm import SyncBatchNormFunction, local_stats, merge_stats, sync_cost
from helpers import (
    GRAD_TOL,
    OUT_TOL,
    STAT_TOL,
    assert_buffers_exactly,
    assert_close,
    buffers_snapshot,
    random_affine,
    random_input,
    set_affine,
    torch_bn_for_ndim,
)

WORLD = 3
# torch 2.13's BatchNorms take bias=; older ones (2.11 on the GPU machine) do not,
# so cases that need it as the reference are skipped there.
TORCH_HAS_BIAS = "bias" in inspect.signature(torch.nn.BatchNorm1d.__init__).parameters
needs_torch_bias = pytest.mark.skipif(not TORCH_HAS_BIAS, reason="this torch's BatchNorm has no bias=")

# --------------------------------------------------------------------------
# The multi-process cases: (name, ranks in the group, rows per rank, shape
# after N, dtype, constructor kwargs, steps). Rows per rank may be unequal or 0.
# --------------------------------------------------------------------------
CASES = [
    ("2d-equal", 2, [4, 4], (3,), torch.float64, dict(), 3),
    ("2d-unequal-one-row", 2, [1, 6], (3,), torch.float64, dict(momentum=0.3), 3),
    ("2d-two-empty", 3, [0, 5, 0], (2,), torch.float64, dict(), 2),
    ("3d-empty-slice", 3, [2, 0, 3], (4, 5), torch.float64, dict(momentum=None), 3),
    ("4d-unequal", 3, [3, 1, 2], (3, 4, 5), torch.float64, dict(affine=False), 3),
    ("4d-bias-false", 2, [2, 5], (2, 3, 3), torch.float64, dict(bias=False, eps=1e-3), 2),
    ("5d-unequal", 2, [2, 3], (2, 3, 2, 2), torch.float64, dict(momentum=0.5), 3),
    ("5d-three", 3, [1, 2, 1], (3, 2, 2, 3), torch.float64, dict(momentum=None, affine=False), 2),
    ("3d-not-tracked", 2, [3, 2], (4, 6), torch.float64, dict(track_running_stats=False), 2),
    ("4d-float32", 3, [4, 4, 4], (3, 5, 5), torch.float32, dict(), 2),
    ("4d-channels-last", 2, [3, 4], (3, 4, 5), torch.float32, dict(), 2),
]

# Every multi-process case runs on each CPU path of bnlib (the fused C++
# loops and the tensor ops), in the same processes.
CPU_PATHS = ["kernels", "tensor_ops"]


def cpu_paths_here():
    """The CPU paths this machine can run (the kernels need a C++ compiler)."""
    from bnlib import cpu_kernels

    return CPU_PATHS if cpu_kernels.is_available() else CPU_PATHS[1:]


def case_data(case):
    """Whole-batch inputs and upstream gradients, one pair per step (the same in every process)."""
    name, _, sizes, tail, dtype, _, steps = case
    n = sum(sizes)
    seed = sum(map(ord, name))
    return [(random_input((n,) + tail, dtype, seed=seed + s), random_input((n,) + tail, dtype, seed=seed + 50 + s,
                                                                           spread=False)) for s in range(steps)]


def rows_of(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _grads(module):
    return {k: (None if p.grad is None else p.grad.clone()) for k, p in module.named_parameters()}


def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


# ---------------------------- what the processes run ----------------------


def _run_case(rank, case, group):
    name, _, sizes, tail, dtype, cfg, _ = case
    module = bnlib.nn.SyncBatchNorm(tail[0], dtype=dtype, process_group=group, **cfg)
    set_affine(module, *random_affine(tail[0], dtype))
    steps = []
    layout = torch.channels_last if "channels-last" in name else torch.contiguous_format
    for x_all, dy_all in case_data(case):
        x = x_all[rows_of(sizes, rank)].contiguous(memory_format=layout).requires_grad_(True)
        y = module(x)
        y.backward(dy_all[rows_of(sizes, rank)])
        steps.append(dict(y=y.detach(), dx=x.grad, grads=_grads(module), buffers=_buffers(module)))
        module.zero_grad(set_to_none=True)
    module.eval()
    with torch.no_grad():
        y_eval = module(case_data(case)[0][0][rows_of(sizes, rank)])
    return dict(steps=steps, y_eval=y_eval)


def _float32_large_mean(rank, group):
    """Mean 1e4, std 1, float32, unequal slices: the merged variance must stay accurate."""
    sizes = [5, 3, 9]
    g = torch.Generator().manual_seed(7)
    x_all = (1e4 + torch.randn(sum(sizes), 4, 50, generator=g, dtype=torch.float64))
    module = bnlib.nn.SyncBatchNorm(4, momentum=1.0)  # running_var = the unbiased batch variance
    module(x_all[rows_of(sizes, rank)].float())
    return dict(x_all=x_all, running_var=module.running_var.clone(), running_mean=module.running_mean.clone())


def _bad_input(rank, group01):
    """Errors raised on every rank alike (no deadlock), state untouched, then a good step."""
    out = {}
    module = bnlib.nn.SyncBatchNorm(3, dtype=torch.float64)
    set_affine(module, *random_affine(3, torch.float64))
    before = buffers_snapshot(module)
    weight_before = module.weight.detach().clone()

    def attempt(key, x):
        try:
            module(x)
            out[key] = None
        except ValueError as err:
            out[key] = str(err)
        out[key + ":untouched"] = (all(torch.equal(getattr(module, k), v) for k, v in before.items())
                                   and torch.equal(module.weight.detach(), weight_before))

    # One value per channel over the whole group: (N, C) with N = 1 + 0 + 0 over 3 ranks.
    attempt("global-one", torch.ones(1 if rank == 1 else 0, 3, dtype=torch.float64))
    # (N, C, 1) with one row on rank 0 only.
    attempt("global-one-3d", torch.ones(1 if rank == 0 else 0, 3, 1, dtype=torch.float64))
    attempt("1d", torch.ones(3, dtype=torch.float64))
    attempt("channels", torch.ones(4, 5, dtype=torch.float64))
    # One row on each rank is fine: 3 values per channel globally.
    attempt("one-row-each", random_input((1, 3), torch.float64, seed=rank))
    out["nbt"] = int(module.num_batches_tracked)
    # The collectives are still in step after the errors: a good step on the 2-rank group.
    if rank < 2:
        m2 = bnlib.nn.SyncBatchNorm(3, dtype=torch.float64, process_group=group01)
        attempt_x = random_input((1, 3), torch.float64, seed=10 + rank)
        out["after"] = m2(attempt_x).detach()
    return out


def _nan_channel(rank, group01):
    """A NaN in channel 0 of rank 1's slice: channel 0 keeps its running stats on both ranks."""
    x_all = random_input((6, 3, 2), torch.float64, seed=3)
    x_nan = x_all.clone()
    x_nan[4, 0, 1] = float("nan")  # row 4 is on rank 1 (rows 3..5)
    module = bnlib.nn.SyncBatchNorm(3, dtype=torch.float64, process_group=group01)
    module(x_nan[rows_of([3, 3], rank)])
    return dict(x_all=x_all, buffers=_buffers(module))


def _outside_group(rank, group01):
    """Rank 2 is not in group01: its SyncBatchNorm is plain BatchNorm."""
    x = random_input((5, 3, 4), torch.float64, seed=11)
    module = bnlib.nn.SyncBatchNorm(3, dtype=torch.float64, process_group=group01)
    xr = x.clone().requires_grad_(True)
    y = module(xr)
    y.backward(torch.ones_like(y))
    return dict(x=x, y=y.detach(), dx=xr.grad, buffers=_buffers(module))


def make_ddp_cnn():
    """A small float64 CNN mixing torch's and bnlib's BatchNorms (convert handles both)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1, bias=False),
        bnlib.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 6, bias=False),
        bnlib.nn.BatchNorm1d(6, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 3),
    ).double()


def ddp_data(steps=3, batch=8):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 2, 5, 5, generator=g, dtype=torch.float64) * 2 + 1,
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


def train_ddp_cnn(model, rank=None, group=None):
    """3 steps of momentum SGD on ddp_data(), mean loss; returns the final state dict.

    With a process group: DDP, this rank's slice of 4 rows of each batch of 8.
    Without: the whole batch in this process.
    """
    net = model if group is None else torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for x, y in ddp_data():
        if group is not None:
            x, y = x[4 * rank: 4 * rank + 4], y[4 * rank: 4 * rank + 4]
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _ddp(rank, group01):
    """DDP + SyncBN on ranks {0, 1}, equal slices of 4 rows, mean loss per rank.

    DDP averages the two ranks' gradients; each is a share of the gradient of
    the SUM of both ranks' losses (SyncBN couples them), so the average is the
    gradient of the whole-batch mean loss: one process, plain BN, whole batch.
    """
    model = bnlib.nn.SyncBatchNorm.convert_sync_batchnorm(make_ddp_cnn(), process_group=group01)
    return train_ddp_cnn(model, rank, group01)


def _ddp_local_bn(rank, group01):
    """DDP with the BNs as they are (each rank normalizes its own 4 rows)."""
    return train_ddp_cnn(make_ddp_cnn(), rank, group01)


def _checkpointed(rank, group01):
    """SyncBN as a block under a non-reentrant checkpoint: 2 ranks of 4 rows, 2 steps."""
    from torch.utils.checkpoint import checkpoint

    layer = bnlib.nn.SyncBatchNorm(3, process_group=group01, dtype=torch.float64)
    for step in range(2):
        x_all = random_input((8, 3, 4), torch.float64, seed=70 + step)
        x = x_all[4 * rank: 4 * rank + 4].clone().requires_grad_(True)
        checkpoint(layer, x, use_reentrant=False).sum().backward()
    return _buffers(layer)


def _estimates_none(rank, group01):
    """Running estimates set to None (torch allows it): 2 ranks of 3 rows, one step."""
    layer = bnlib.nn.SyncBatchNorm(3, process_group=group01, dtype=torch.float64)
    layer.running_mean = layer.running_var = None
    x_all = random_input((6, 3), torch.float64, seed=80)
    y = layer(x_all[rows_of([3, 3], rank)])
    return dict(y=y.detach(), num_batches_tracked=layer.num_batches_tracked.clone())


def worker(rank, world_size):
    group01 = dist.new_group([0, 1])  # every rank must call new_group
    groups = {2: group01, 3: None}
    results = {"cases": {}, "large_mean": {}}
    for path in cpu_paths_here():
        previous = BF.set_cpu_backend(path)
        results["cases"][path] = {case[0]: _run_case(rank, case, groups[case[1]])
                                  for case in CASES if rank < case[1]}
        results["large_mean"][path] = _float32_large_mean(rank, None)
        BF.set_cpu_backend(previous)
    results["bad"] = _bad_input(rank, group01)
    if rank < 2:
        results["nan"] = _nan_channel(rank, group01)
        results["ddp"] = _ddp(rank, group01)
        results["ddp_local_bn"] = _ddp_local_bn(rank, group01)
        results["checkpointed"] = _checkpointed(rank, group01)
        results["estimates_none"] = _estimates_none(rank, group01)
    else:
        results["outside"] = _outside_group(rank, group01)
    return results


@pytest.fixture(scope="module")
def ranks():
    """The results of every rank, from one launch of WORLD processes."""
    return launch(worker, WORLD)


# ------------------------------- the comparisons ---------------------------


def _torch_reference(case):
    """torch.nn.BatchNorm*d on the whole batch: per step y, dx, param grads, buffers."""
    name, _, sizes, tail, dtype, cfg, _ = case
    ref = torch_bn_for_ndim(1 + len(tail))(tail[0], dtype=dtype, **cfg)
    set_affine(ref, *random_affine(tail[0], dtype))
    steps = []
    for x_all, dy_all in case_data(case):
        x = x_all.clone().requires_grad_(True)
        y = ref(x)
        y.backward(dy_all)
        steps.append(dict(y=y.detach(), dx=x.grad, grads=_grads(ref), buffers=_buffers(ref)))
        ref.zero_grad(set_to_none=True)
    ref.eval()
    with torch.no_grad():
        x_eval = case_data(case)[0][0]
        if ref.track_running_stats:
            y_eval = ref(x_eval)
        else:  # eval without running estimates: each rank's own batch statistics, no sync (as torch)
            y_eval = torch.cat([ref(x_eval[rows_of(sizes, r)]) if sizes[r] else x_eval[:0]
                                for r in range(len(sizes))])
    return steps, y_eval


def _path_results(ranks, path):
    """Every rank's case results on CPU path ``path`` (skips where it cannot run)."""
    if path not in ranks[0]["cases"]:
        pytest.skip(f"bnlib's {path} path does not run here")
    return [r["cases"][path] for r in ranks]


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=[needs_torch_bias] if "bias" in c[5] else [])
                                  for c in CASES])
def test_slices_equal_whole_batch(ranks, case, path):
    name, members, sizes, _, dtype, _, _ = case
    results = _path_results(ranks, path)
    ref_steps, ref_eval = _torch_reference(case)
    for step, ref in enumerate(ref_steps):
        what = f"{name} step {step} ({path})"
        for rank in range(members):
            got = results[rank][name]["steps"][step]
            rows = rows_of(sizes, rank)
            assert got["y"].dtype == ref["y"].dtype and got["y"].shape == ref["y"][rows].shape
            if "channels-last" in name:  # the output and dx keep the input's memory layout
                assert got["y"].is_contiguous(memory_format=torch.channels_last), what
                assert got["dx"].is_contiguous(memory_format=torch.channels_last), what
            assert_close(got["y"], ref["y"][rows], OUT_TOL[dtype], f"{what} rank {rank}: output")
            assert_close(got["dx"], ref["dx"][rows], GRAD_TOL[dtype], f"{what} rank {rank}: input grad")
            for key, value in ref["buffers"].items():
                if key == "num_batches_tracked":
                    assert torch.equal(got["buffers"][key], value), f"{what} rank {rank}: {key}"
                else:
                    assert_close(got["buffers"][key], value, STAT_TOL[dtype], f"{what} rank {rank}: {key}")
            assert set(got["buffers"]) == set(ref["buffers"])
        for key, value in ref["grads"].items():
            total = sum(results[r][name]["steps"][step]["grads"][key] for r in range(members))
            assert_close(total, value, GRAD_TOL[dtype], f"{what}: {key}.grad summed over ranks")
    for rank in range(members):
        got = results[rank][name]["y_eval"]
        assert_close(got, ref_eval[rows_of(sizes, rank)], OUT_TOL[dtype], f"{name} rank {rank}: eval output")


@pytest.mark.parametrize("path", CPU_PATHS)
def test_float32_large_mean_is_stable(ranks, path):
    """float32, mean 1e4, std 1: the merged unbiased variance within 1e-3 of float64's."""
    _path_results(ranks, path)
    x_all = ranks[0]["large_mean"][path]["x_all"]
    truth = x_all.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    for rank in range(WORLD):
        got = ranks[rank]["large_mean"][path]["running_var"].double()
        rel = float(((got - truth).abs() / truth).max())
        assert rel < 1e-3, f"rank {rank} ({path}): relative error of the variance {rel:.2e}"
        assert_close(ranks[rank]["large_mean"][path]["running_mean"].double(), x_all.mean(dim=(0, 2)),
                     dict(rtol=1e-6, atol=0), f"rank {rank} ({path}): mean")


def test_global_one_value_per_channel_raises_on_every_rank(ranks):
    for rank in range(WORLD):
        bad = ranks[rank]["bad"]
        for key in ("global-one", "global-one-3d"):
            assert bad[key] is not None, f"rank {rank}: {key} did not raise"
            assert "Expected more than 1 value per channel when training" in bad[key]
            assert "1 value per channel over the 3 ranks" in bad[key]
            assert bad[key + ":untouched"], f"rank {rank}: {key} changed the state"
        assert bad["one-row-each"] is None, f"rank {rank}: one row per rank raised {bad['one-row-each']}"
        assert bad["nbt"] == 1, "only the good call counts as a batch"


def test_shape_errors_on_every_rank(ranks):
    for rank in range(WORLD):
        bad = ranks[rank]["bad"]
        assert bad["1d"] is not None and "at least 2D" in bad["1d"] and "1D" in bad["1d"]
        assert bad["channels"] is not None and "3 channels" in bad["channels"] and "got 5" in bad["channels"]
        assert bad["1d:untouched"] and bad["channels:untouched"]


def test_collectives_in_step_after_errors(ranks):
    """After the errors, a 2-rank step of one row each equals BN on the two rows."""
    x = torch.cat([random_input((1, 3), torch.float64, seed=10 + r) for r in range(2)])
    truth = F.batch_norm(x, None, None, training=True)
    for rank in range(2):
        assert_close(ranks[rank]["bad"]["after"], truth[rank:rank + 1], OUT_TOL[torch.float64], f"rank {rank}")


def test_nan_channel_keeps_running_stats_on_every_rank(ranks):
    x_all = ranks[0]["nan"]["x_all"]
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    ref(x_all)  # the clean batch: channels 1 and 2 must match it
    for rank in range(2):
        buffers = ranks[rank]["nan"]["buffers"]
        assert float(buffers["running_mean"][0]) == 0.0 and float(buffers["running_var"][0]) == 1.0
        assert_close(buffers["running_mean"][1:], ref.running_mean[1:], STAT_TOL[torch.float64], "mean")
        assert_close(buffers["running_var"][1:], ref.running_var[1:], STAT_TOL[torch.float64], "var")
        assert int(buffers["num_batches_tracked"]) == 1


def test_rank_outside_group_runs_plain_batchnorm(ranks):
    got = ranks[2]["outside"]
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    x = got["x"].clone().requires_grad_(True)
    y = ref(x)
    y.backward(torch.ones_like(y))
    assert_close(got["y"], y.detach(), OUT_TOL[torch.float64], "output")
    assert_close(got["dx"], x.grad, GRAD_TOL[torch.float64], "input grad")
    assert_close(got["buffers"]["running_var"], ref.running_var, STAT_TOL[torch.float64], "running_var")


def test_ddp_with_syncbn_equals_one_process_whole_batch(ranks):
    truth = train_ddp_cnn(make_ddp_cnn())
    for rank in range(2):
        got = ranks[rank]["ddp"]
        assert set(got) == set(truth)
        for key, value in truth.items():
            if key.endswith("num_batches_tracked"):
                assert torch.equal(got[key], value), key
            else:
                # 3 steps of momentum SGD through 3 BNs: rounding grows a little, still ~1e-13.
                assert_close(got[key], value, dict(rtol=1e-9, atol=1e-10), f"rank {rank}: {key}")


def test_ddp_with_local_bn_equals_ghost_bn_keeping_the_first_slices_statistics(ranks):
    """DDP, BN not synced: rank r normalizes its own 4 rows, and DDP's
    forward_sync_buffers (its default; the older broadcast_buffers is still
    accepted in torch 2.13, but deprecated) copies rank 0's running estimates
    to every rank at the start of each training forward. One process with
    GhostBatchNorm(virtual_batch_size=4, running_stats="first") is the same
    run: rank 0's parameters and buffers; rank 1's parameters, while its
    buffers hold one update from its own rows (overwritten at the next step)."""
    model = make_ddp_cnn()
    for i, layer in enumerate(model):
        if isinstance(layer, (torch.nn.modules.batchnorm._BatchNorm, bnlib.nn.BatchNorm1d, bnlib.nn.BatchNorm2d)):
            ghost = bnlib.nn.GhostBatchNorm(layer.num_features, 4, eps=layer.eps, momentum=layer.momentum,
                                            dtype=torch.float64, running_stats="first")
            ghost.load_state_dict(layer.state_dict())
            model[i] = ghost
    truth = train_ddp_cnn(model)
    for rank in range(2):
        got = ranks[rank]["ddp_local_bn"]
        assert set(got) == set(truth)
        for key, value in truth.items():
            if rank == 1 and "running" in key:
                assert not torch.allclose(got[key], value), f"rank 1 updated {key} from its own rows"
            else:
                assert_close(got[key].to(value.dtype), value, dict(rtol=1e-9, atol=1e-10), f"rank {rank}: {key}")


# ------------------------- in one process, no launch -------------------------


def test_constructor_matches_torch_syncbatchnorm():
    ours = inspect.signature(bnlib.nn.SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(torch.nn.SyncBatchNorm.__init__).parameters
    assert list(ours) == list(theirs) + ([] if TORCH_HAS_BIAS else ["bias"])
    assert ours["bias"].kind == inspect.Parameter.KEYWORD_ONLY and ours["bias"].default is True
    for name in theirs:
        assert ours[name].default == theirs[name].default, name
        assert ours[name].kind == theirs[name].kind, name
    m = bnlib.nn.SyncBatchNorm(5, 1e-3, 0.2, True, True, None, None, torch.float64, bias=False)
    assert (m.num_features, m.eps, m.momentum, m.process_group, m.bias) == (5, 1e-3, 0.2, None, None)
    assert m.weight.dtype == torch.float64


@pytest.mark.parametrize("kw", [dict(), dict(affine=False), pytest.param(dict(bias=False), marks=needs_torch_bias),
                                dict(track_running_stats=False)])
def test_state_dict_loads_both_ways(kw):
    torch.manual_seed(0)
    theirs = torch.nn.SyncBatchNorm(4, **kw)
    ours = bnlib.nn.SyncBatchNorm(4, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    with torch.no_grad():
        for t in theirs.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.SyncBatchNorm(4, **kw)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value) and torch.equal(back.state_dict()[key], value), key
    # and with the plain BatchNorms
    bnlib.nn.BatchNorm2d(4, **kw).load_state_dict(ours.state_dict())
    ours.load_state_dict(torch.nn.BatchNorm2d(4, **kw).state_dict())


def test_convert_mixed_model_keeps_state():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4, momentum=0.3, eps=1e-3),
        torch.nn.Sequential(bnlib.nn.BatchNorm2d(4, affine=False), torch.nn.ReLU()),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 5),
        bnlib.nn.BatchNorm1d(5, bias=False, momentum=None),
        torch.nn.BatchNorm1d(5, track_running_stats=False),
        bnlib.nn.GhostBatchNorm(5, 2),
    )
    model(torch.randn(6, 3, 2, 2))  # some running statistics
    model[6].double()
    model[5].weight.requires_grad_(False)
    model[2][0].eval()
    old = list(model.children())
    old_inner = model[2][0]
    before = copy.deepcopy(model.state_dict())
    marker = object()
    out = bnlib.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=marker)
    assert out is model
    for i in (1, 5, 6):
        assert type(model[i]) is bnlib.nn.SyncBatchNorm and model[i].process_group is marker
    assert type(model[2][0]) is bnlib.nn.SyncBatchNorm
    assert type(model[7]) is bnlib.nn.GhostBatchNorm, "ghost BN is a model choice, not converted"
    assert model[0] is old[0] and model[4] is old[4]
    # the same tensors, not copies: optimizers keep their references
    assert model[1].weight is old[1].weight and model[1].bias is old[1].bias
    assert model[1].running_mean is old[1].running_mean and model[1].num_batches_tracked is old[1].num_batches_tracked
    assert (model[1].eps, model[1].momentum) == (1e-3, 0.3)
    assert model[5].bias is None and model[5].momentum is None and not model[5].weight.requires_grad
    assert model[2][0].affine is False and model[2][0].training is False and model[2][0] is not old_inner
    assert model[6].running_mean is None and model[6].track_running_stats is False
    assert model[6].weight.dtype == torch.float64
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_convert_a_bare_batchnorm_returns_a_new_layer():
    bn = torch.nn.BatchNorm3d(2)
    out = bnlib.nn.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(out) is bnlib.nn.SyncBatchNorm and out.weight is bn.weight
    # a torch.nn.SyncBatchNorm converts too
    out2 = bnlib.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.SyncBatchNorm(2))
    assert type(out2) is bnlib.nn.SyncBatchNorm


SHAPES = [(6, 3), (4, 3, 5), (3, 3, 4, 2), (2, 3, 2, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("kw", [dict(), pytest.param(dict(momentum=None, bias=False), marks=needs_torch_bias),
                                dict(momentum=None), dict(track_running_stats=False)])
def test_without_process_group_equals_batchnorm(shape, kw):
    """No process group: plain BatchNorm, train (3 steps) and eval."""
    assert not dist.is_initialized()
    ours = bnlib.nn.SyncBatchNorm(3, dtype=torch.float64, **kw)
    ref = torch_bn_for_ndim(len(shape))(3, dtype=torch.float64, **kw)
    w, b = random_affine(3)
    set_affine(ours, w, b)
    set_affine(ref, w, b)
    for step in range(3):
        x = random_input(shape, seed=step)
        xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yo, yr = ours(xo), ref(xr)
        dy = random_input(shape, seed=40 + step, spread=False)
        yo.backward(dy)
        yr.backward(dy)
        assert_close(yo, yr, OUT_TOL[torch.float64], "output")
        assert_close(xo.grad, xr.grad, GRAD_TOL[torch.float64], "input grad")
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, GRAD_TOL[torch.float64], "param grad")
            p.grad = q.grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            a, c = getattr(ours, name), getattr(ref, name)
            assert (a is None) == (c is None) and (a is None or torch.allclose(a, c, rtol=1e-10, atol=1e-12)), name
    ours.eval(), ref.eval()
    x = random_input(shape, seed=9)
    assert_close(ours(x), ref(x), OUT_TOL[torch.float64], "eval output")


@pytest.mark.parametrize("bad_shape, pattern", [((3,), "at least 2D"), ((), "at least 2D"),
                                                ((4, 2), "3 channels"), ((4, 5, 2), "3 channels"),
                                                ((1, 3), "more than 1 value per channel"),
                                                ((1, 3, 1, 1), "more than 1 value per channel")])
def test_bad_input_raises_and_keeps_state(bad_shape, pattern):
    m = bnlib.nn.SyncBatchNorm(3)
    m(torch.randn(4, 3))
    snap = buffers_snapshot(m)
    with pytest.raises(ValueError, match=pattern):
        m(torch.randn(bad_shape))
    assert_buffers_exactly(m, snap)


@pytest.mark.parametrize("kw", [dict(num_features=0), dict(eps=0.0), dict(momentum=1.5)])
def test_bad_constructor_arguments(kw):
    args = dict(num_features=3) | kw
    with pytest.raises(ValueError):
        bnlib.nn.SyncBatchNorm(**args)


# ----------------- the merge and the function, in one process ----------------


def _pairwise_chan(parts):
    """The textbook pairwise update, part after part (an independent formula)."""
    n, mu, m2 = 0.0, 0.0, 0.0
    for x in parts:
        nb = x.size
        if nb == 0:
            continue
        mub = x.mean()
        m2b = ((x - mub) ** 2).sum()
        delta = mub - mu
        total = n + nb
        mu = mu + delta * nb / total
        m2 = m2 + m2b + delta ** 2 * n * nb / total
        n = total
    return n, mu, m2


def test_merge_stats_equals_whole_batch_and_pairwise_formula():
    rng = np.random.default_rng(0)
    sizes = [3, 0, 7, 1, 12]
    parts = [rng.normal(5.0, 2.0, size=(s, 4, 3)) for s in sizes]
    stats = [local_stats(torch.from_numpy(p)) for p in parts]
    count, mu, m2 = merge_stats(*(torch.stack(t) for t in zip(*stats)))
    whole = np.concatenate(parts)
    per_channel = whole.transpose(1, 0, 2).reshape(4, -1)
    np.testing.assert_allclose(count.numpy(), per_channel.shape[1])
    np.testing.assert_allclose(mu.numpy(), per_channel.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(m2.numpy(), ((per_channel - per_channel.mean(1, keepdims=True)) ** 2).sum(1),
                               rtol=1e-12)
    for c in range(4):
        n, mu_c, m2_c = _pairwise_chan([p[:, c].ravel() for p in parts])
        assert n == count[c] and abs(mu_c - float(mu[c])) < 1e-12 and abs(m2_c - float(m2[c])) < 1e-10


def test_merge_stats_float32_large_mean():
    """Mean 1e4, std 1, in float32: the merged variance within 1e-3 of float64's
    (E[x^2] - E[x]^2 in float32 would lose every digit: 1e8 * 6e-8 ~ 6)."""
    rng = np.random.default_rng(1)
    parts = [1e4 + rng.normal(size=(s, 2, 20)) for s in (4, 9, 1)]
    stats = [local_stats(torch.from_numpy(p).float()) for p in parts]
    count, mu, m2 = merge_stats(*(torch.stack(t) for t in zip(*stats)))
    truth = np.concatenate(parts).transpose(1, 0, 2).reshape(2, -1).var(axis=1)
    np.testing.assert_allclose((m2 / count).double().numpy(), truth, rtol=1e-3)


def test_local_stats_can_be_differentiated():
    """The C++ statistics have no backward, so local_stats takes them only
    where no gradient is asked: differentiated, it is its formula's gradient."""
    x = random_input((6, 3, 4, 2), torch.float32).requires_grad_(True)
    _, mu, m2 = local_stats(x)
    (mu.sum() + m2.sum()).backward()
    x_ref = x.detach().double().requires_grad_(True)
    m_ref = x_ref.mean((0, 2, 3))
    (m_ref.sum() + (x_ref - m_ref.view(1, 3, 1, 1)).square().sum((0, 2, 3)).sum()).backward()
    assert_close(x.grad.double(), x_ref.grad, GRAD_TOL[torch.float32], "dx of local_stats")
    grad = torch.func.grad(lambda t: local_stats(t)[2].sum())(x.detach())
    assert_close(grad.double(), 2 * (x_ref - m_ref.view(1, 3, 1, 1)).detach(), GRAD_TOL[torch.float32], "func.grad")


def test_merge_of_nothing_is_nan():
    count, mu, m2 = merge_stats(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    assert torch.equal(count, torch.zeros(3)) and torch.isnan(mu).all() and torch.isnan(m2).all()


@pytest.fixture
def one_process_group():
    """A gloo group of one process, this one, torn down afterwards."""
    assert not dist.is_initialized()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def test_one_rank_group_is_plain_batchnorm_without_communication(one_process_group, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a group of one rank must not communicate")

    monkeypatch.setattr(dist, "all_gather", forbidden)
    monkeypatch.setattr(dist, "all_reduce", forbidden)
    ours, ref = bnlib.nn.SyncBatchNorm(3, dtype=torch.float64), torch.nn.BatchNorm2d(3, dtype=torch.float64)
    x = random_input((4, 3, 2, 2))
    xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yo, yr = ours(xo), ref(xr)
    yo.sum().backward()
    yr.sum().backward()
    assert_close(yo, yr, OUT_TOL[torch.float64], "output")
    assert_close(xo.grad, xr.grad, GRAD_TOL[torch.float64], "input grad")
    assert_close(ours.running_var, ref.running_var, STAT_TOL[torch.float64], "running_var")


@pytest.mark.usefixtures("each_cpu_path")
def test_sync_function_gradcheck_on_one_rank(one_process_group):
    """The hand-written backward against float64 finite differences, the
    collectives run (a group of one), so every line of both passes runs."""
    x = random_input((3, 2, 2)).requires_grad_(True)
    w, b = random_affine(2)
    w.requires_grad_(True)
    b.requires_grad_(True)

    def f(x, w, b):
        return SyncBatchNormFunction.apply(x, w, b, 1e-5, one_process_group)[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)
    y = f(x, w, b)
    assert_close(y, F.batch_norm(x, None, None, w, b, training=True), OUT_TOL[torch.float64], "output")


@pytest.mark.usefixtures("each_cpu_path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sync_function_saves_no_new_activation(one_process_group, dtype):
    """What the forward keeps for the backward: the input itself (alive anyway)
    and per-channel values, never a new tensor of the input's size such as
    x - mu (in float32 for a half input, twice the input's bytes)."""
    from bnlib import perf

    x = torch.randn(8, 4, 6, 5, dtype=dtype, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    _, saved = perf.saved_tensors(lambda x: SyncBatchNormFunction.apply(x, w, b, 1e-5, one_process_group)[0], x)
    big = [t for t in saved if t["bytes"] >= x.numel() * x.element_size()]
    assert big and all(t["is_arg"] for t in big), big


# ------------------------------------ CUDA -----------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def nccl_one_process_group():
    assert not dist.is_initialized()
    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 7), (3, 5, 4, 6), (2, 5, 3, 2, 4), (0, 5, 3)], ids=str)
def test_cuda_nccl_function_equals_batchnorm(nccl_one_process_group, dtype, shape):
    """The sync path on CUDA tensors through NCCL (a group of one rank, the
    collectives do run) against torch.nn.functional.batch_norm on the GPU."""
    x = random_input(shape, torch.float64).to("cuda", dtype).requires_grad_(True)
    w, b = (t.cuda() for t in random_affine(5, torch.float32 if dtype != torch.float64 else dtype))
    w.requires_grad_(True)
    b.requires_grad_(True)
    y, mu, var, count = SyncBatchNormFunction.apply(x, w, b, 1e-5, nccl_one_process_group)
    assert y.dtype == dtype and y.device == x.device
    dy = torch.ones_like(y) if shape[0] == 0 else random_input(shape, torch.float64, seed=1).to("cuda", dtype)
    y.backward(dy)
    xr = x.detach().clone().requires_grad_(True)
    wr, br = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    yr = F.batch_norm(xr, None, None, wr, br, training=True)
    yr.backward(dy)
    if shape[0] == 0:  # an empty batch: empty output and input gradient, zero parameter gradients
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert not w.grad.any() and not b.grad.any()
        return
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.float(), yr.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.float(), xr.grad.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad.float(), wr.grad.float(), rtol=tol, atol=tol * 10)
    torch.testing.assert_close(b.grad.float(), br.grad.float(), rtol=tol, atol=tol * 10)


@pytest.mark.cuda
@cuda
def test_cuda_module_one_rank_and_eval(nccl_one_process_group):
    """The module on CUDA with a one-rank NCCL group: plain BN, like torch's."""
    ours = bnlib.nn.SyncBatchNorm(4).cuda()
    ref = torch.nn.BatchNorm2d(4).cuda()
    for step in range(2):
        x = random_input((3, 4, 5, 5), torch.float32, seed=step).cuda()
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


def _nccl_worker(rank, world_size):
    case = ("4d-nccl", world_size, [3, 0, 2, 4, 1, 2, 2, 3][:world_size], (3, 4, 5), torch.float32, dict(), 2)
    torch.manual_seed(0)
    module = bnlib.nn.SyncBatchNorm(3).cuda()
    out = []
    for x_all, dy_all in case_data(case):
        x = x_all[rows_of(case[2], rank)].cuda().requires_grad_(True)
        y = module(x)
        y.backward(dy_all[rows_of(case[2], rank)].cuda())
        out.append(dict(y=y.detach().cpu(), dx=x.grad.cpu(), buffers={k: v.cpu() for k, v in _buffers(module).items()},
                        grads={k: p.grad.cpu() for k, p in module.named_parameters()}))
        module.zero_grad(set_to_none=True)
    return dict(case=case, steps=out)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_nccl_several_gpus():
    world = min(torch.cuda.device_count(), 8)
    results = launch(_nccl_worker, world, backend="nccl")
    case = results[0]["case"]
    ref = torch.nn.BatchNorm2d(3)
    for step, (x_all, dy_all) in enumerate(case_data(case)):
        x = x_all.clone().requires_grad_(True)
        y = ref(x)
        y.backward(dy_all)
        for rank in range(world):
            got = results[rank]["steps"][step]
            rows = rows_of(case[2], rank)
            assert_close(got["y"], y.detach()[rows], OUT_TOL[torch.float32], f"rank {rank} output")
            assert_close(got["dx"], x.grad[rows], GRAD_TOL[torch.float32], f"rank {rank} dx")
            assert_close(got["buffers"]["running_var"], ref.running_var, STAT_TOL[torch.float32], "running_var")
        total = sum(results[r]["steps"][step]["grads"]["weight"] for r in range(world))
        assert_close(total, ref.weight.grad, GRAD_TOL[torch.float32], "weight grad")
        ref.zero_grad(set_to_none=True)


def test_sync_cost_closed_form():
    """Two collectives per layer; 3 C b bytes sent, 3 C b (W - 1) received, 2 C b all-reduced."""
    cost = sync_cost([8, 16, 32], world_size=4)
    assert cost == {"collectives": 6, "forward_sent": 3 * 56 * 4, "forward_received": 3 * 56 * 4 * 3,
                    "backward_payload": 2 * 56 * 4, "backward_ring_traffic": 2 * 3 * (2 * 56 * 4) / 4}
    assert sync_cost(10, 1, bytes_per_value=8)["forward_received"] == 0


def test_demo_cnn_is_the_same_network_with_either_batchnorm():
    """bnlib.distributed_demo.make_cnn: the same seed gives the same weights and,
    with bnlib's or torch's BatchNorm, the same logits; a ghost size gives GhostBatchNorm."""
    from bnlib.distributed_demo import make_cnn

    x = random_input((6, 1, 8, 8), torch.float32, seed=2)
    ours, theirs = make_cnn("bn", seed=3), make_cnn("torch", seed=3)
    assert_close(ours(x), theirs(x), OUT_TOL[torch.float32], "logits")
    assert type(make_cnn(2).norm3) is bnlib.nn.GhostBatchNorm and make_cnn(2).norm3.virtual_batch_size == 2
    with pytest.raises(ValueError, match="virtual batch size"):
        make_cnn("ghost")


def test_checkpointed_sync_batchnorm_updates_as_torch(ranks):
    """Under a non-reentrant checkpoint the recomputed forward updates torch's
    estimates, and counts the batch, a second time: SyncBN on two slices
    must end where torch's BN on the whole batch ends."""
    from torch.utils.checkpoint import checkpoint

    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    for step in range(2):
        x = random_input((8, 3, 4), torch.float64, seed=70 + step).requires_grad_(True)
        checkpoint(ref, x, use_reentrant=False).sum().backward()
    assert ref.num_batches_tracked.item() == 4  # torch's own behaviour, which this test pins
    for rank in range(2):
        got = ranks[rank]["checkpointed"]
        assert torch.equal(got["num_batches_tracked"], ref.num_batches_tracked), rank
        assert_close(got["running_mean"], ref.running_mean, STAT_TOL[torch.float64], f"rank {rank}")
        assert_close(got["running_var"], ref.running_var, STAT_TOL[torch.float64], f"rank {rank}")


def test_running_estimates_set_to_none(ranks):
    """torch's rule: batch statistics, nothing updated, the batch counted. Two
    ranks of 3 rows raised AttributeError after counting it."""
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    ref.running_mean = ref.running_var = None
    x_all = random_input((6, 3), torch.float64, seed=80)
    want = ref(x_all).detach()
    for rank in range(2):
        got = ranks[rank]["estimates_none"]
        assert_close(got["y"], want[rows_of([3, 3], rank)], OUT_TOL[torch.float64], f"rank {rank}")
        assert int(got["num_batches_tracked"]) == int(ref.num_batches_tracked) == 1
