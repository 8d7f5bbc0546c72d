"""bnlib.nn.GhostBatchNorm against torch's batch norm applied to each virtual batch.

The truth: with one virtual batch, torch.nn.BatchNorm*d (outputs, gradients,
running statistics, several steps); with k virtual batches,
torch.nn.functional.batch_norm on each chunk (outputs, input gradients,
parameter gradients summed over chunks) and the pooled running statistics
computed here from torch.var of each chunk (mean of the whole batch,
unbiased variance pooled within the chunks). Tolerances are helpers.py's.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import bnlib.nn
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

# Every test here runs on both CPU paths: the fused kernels and the tensor ops.
pytestmark = pytest.mark.usefixtures("each_cpu_path")

F64 = torch.float64
# torch 2.13's BatchNorms take bias=; older ones (2.11 on the GPU machine) do not.
TORCH_HAS_BIAS = "bias" in inspect.signature(torch.nn.BatchNorm1d.__init__).parameters
needs_torch_bias = pytest.mark.skipif(not TORCH_HAS_BIAS, reason="this torch's BatchNorm has no bias=")
SHAPES = [(12, 3), (8, 3, 5), (6, 3, 4, 2), (4, 3, 2, 3, 2)]
CONFIGS = [dict(), dict(momentum=None), dict(affine=False), pytest.param(dict(bias=False, eps=1e-3),
                                                                        marks=needs_torch_bias),
           dict(track_running_stats=False)]


def _ids(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items()) or "default"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_one_virtual_batch_is_batchnorm(shape, cfg):
    """virtual_batch_size >= N: BatchNorm, train (3 steps, changing params) and eval."""
    ours = bnlib.nn.GhostBatchNorm(3, shape[0], dtype=F64, **cfg)
    ref = torch_bn_for_ndim(len(shape))(3, dtype=F64, **cfg)
    w, b = random_affine(3)
    set_affine(ours, w, b)
    set_affine(ref, w, b)
    for step in range(3):
        x = random_input(shape, seed=step)
        dy = random_input(shape, seed=20 + step, spread=False)
        xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yo, yr = ours(xo), ref(xr)
        yo.backward(dy)
        yr.backward(dy)
        assert_close(yo, yr, OUT_TOL[F64], f"step {step}: output")
        assert_close(xo.grad, xr.grad, GRAD_TOL[F64], f"step {step}: input grad")
        with torch.no_grad():
            for p, q in zip(ours.parameters(), ref.parameters()):
                assert_close(p.grad, q.grad, GRAD_TOL[F64], f"step {step}: param grad")
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
                p.grad = q.grad = None
        for name in ("running_mean", "running_var"):
            a, c = getattr(ours, name), getattr(ref, name)
            assert (a is None) == (c is None)
            if a is not None:
                assert_close(a, c, STAT_TOL[F64], f"step {step}: {name}")
        if ref.num_batches_tracked is not None:
            assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)
    ours.eval(), ref.eval()
    x = random_input(shape, seed=9)
    assert_close(ours(x), ref(x), OUT_TOL[F64], "eval output")


def _pooled(x, vbs):
    """The running-estimate update's batch statistics, from torch.var per chunk."""
    chunks = x.split(vbs)
    flat = [c.transpose(0, 1).reshape(c.shape[1], -1) for c in chunks]
    m = sum(f.shape[1] for f in flat)
    mu = sum(f.sum(1) for f in flat) / m
    var = sum((f.shape[1] - 1) * f.var(1, unbiased=True) for f in flat) / (m - len(flat))
    return mu, var


@pytest.mark.parametrize("shape, vbs", [((12, 3), 4), ((12, 3), 5), ((8, 3, 5), 2), ((9, 3, 4, 2), 2),
                                        ((7, 3, 2, 3, 2), 3), ((8, 3, 1), 3)], ids=str)
@pytest.mark.parametrize("cfg", [dict(), dict(momentum=None), dict(bias=False)], ids=_ids)
def test_k_virtual_batches_are_batchnorm_per_chunk(shape, vbs, cfg):
    ours = bnlib.nn.GhostBatchNorm(3, vbs, dtype=F64, **cfg)
    w, b = random_affine(3)
    set_affine(ours, w, b)
    running_mean, running_var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    for step in range(3):
        x = random_input(shape, seed=step)
        dy = random_input(shape, seed=20 + step, spread=False)
        xo = x.clone().requires_grad_(True)
        yo = ours(xo)
        yo.backward(dy)

        xr = x.clone().requires_grad_(True)
        wr = ours.weight.detach().clone().requires_grad_(True)
        br = None if ours.bias is None else ours.bias.detach().clone().requires_grad_(True)
        yr = torch.cat([F.batch_norm(c, None, None, wr, br, training=True, eps=ours.eps) for c in xr.split(vbs)])
        yr.backward(dy)
        assert_close(yo, yr, OUT_TOL[F64], f"step {step}: output")
        assert_close(xo.grad, xr.grad, GRAD_TOL[F64], f"step {step}: input grad")
        assert_close(ours.weight.grad, wr.grad, GRAD_TOL[F64], f"step {step}: weight grad")
        if br is not None:
            assert_close(ours.bias.grad, br.grad, GRAD_TOL[F64], f"step {step}: bias grad")
        ours.zero_grad(set_to_none=True)

        mu, var = _pooled(x, vbs)
        momentum = cfg.get("momentum", 0.1)
        factor = 1 / (step + 1) if momentum is None else momentum  # None: the cumulative average
        running_mean = (1 - factor) * running_mean + factor * mu
        running_var = (1 - factor) * running_var + factor * var
        assert_close(ours.running_mean, running_mean, STAT_TOL[F64], f"step {step}: running_mean")
        assert_close(ours.running_var, running_var, STAT_TOL[F64], f"step {step}: running_var")
        assert int(ours.num_batches_tracked) == step + 1, "one update per forward call"


def test_not_tracked_eval_uses_virtual_batches():
    ours = bnlib.nn.GhostBatchNorm(3, 4, dtype=F64, track_running_stats=False).eval()
    x = random_input((8, 3, 2))
    expected = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.split(4)])
    assert_close(ours(x), expected, OUT_TOL[F64], "eval output")


def test_equal_chunks_pooled_running_var_is_mean_of_unbiased_variances():
    """Equal virtual batches: the update is the plain average of the chunks'
    means and unbiased variances (the closed form of the pooled estimate)."""
    x = random_input((12, 2, 3))
    ours = bnlib.nn.GhostBatchNorm(2, 3, momentum=1.0, dtype=F64)
    ours(x)
    chunks = [c.transpose(0, 1).reshape(2, -1) for c in x.split(3)]
    assert_close(ours.running_mean, torch.stack([c.mean(1) for c in chunks]).mean(0), STAT_TOL[F64], "mean")
    assert_close(ours.running_var, torch.stack([c.var(1) for c in chunks]).mean(0), STAT_TOL[F64], "var")


def test_nan_in_one_virtual_batch_keeps_that_channel():
    x = random_input((8, 3))
    x[5, 1] = float("nan")
    ours = bnlib.nn.GhostBatchNorm(3, 4, dtype=F64)
    y = ours(x)
    assert torch.isnan(y[4:, 1]).all() and torch.isfinite(y[:4]).all()
    assert float(ours.running_mean[1]) == 0.0 and float(ours.running_var[1]) == 1.0
    mu, var = _pooled(x[:, [0, 2]], 4)
    assert_close(ours.running_mean[[0, 2]], 0.1 * mu, STAT_TOL[F64], "mean")
    assert_close(ours.running_var[[0, 2]], 0.9 + 0.1 * var, STAT_TOL[F64], "var")


def test_empty_batch_like_batchnorm():
    ours = bnlib.nn.GhostBatchNorm(3, 2)
    x = torch.zeros(0, 3, requires_grad=True)
    y = ours(x)
    y.sum().backward()
    assert y.shape == (0, 3) and x.grad.shape == (0, 3)
    assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(ours.running_var, torch.ones(3))
    assert int(ours.num_batches_tracked) == 1  # as torch.nn.BatchNorm1d on an empty batch


def test_half_precision_keeps_dtype():
    x = random_input((8, 3, 4)).to(torch.bfloat16)
    y = bnlib.nn.GhostBatchNorm(3, 4)(x)
    expected = torch.cat([F.batch_norm(c.float(), None, None, training=True) for c in x.split(4)])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=2e-2)  # bfloat16 has 8 bits of mantissa


@pytest.mark.parametrize("bad_shape, pattern", [
    ((3,), "at least 2D"),
    ((8, 4), "3 channels"),
    ((9, 3), r"virtual batch of input size \[1, 3\]"),  # 4 + 4 + 1 rows
    ((1, 3), r"virtual batch of input size \[1, 3\]"),
])
def test_bad_input_raises_and_keeps_state(bad_shape, pattern):
    ours = bnlib.nn.GhostBatchNorm(3, 4)
    ours(torch.randn(8, 3))
    snap = buffers_snapshot(ours)
    with pytest.raises(ValueError, match=pattern):
        ours(torch.randn(bad_shape))
    assert_buffers_exactly(ours, snap)


def test_last_virtual_batch_of_one_row_is_fine_with_spatial_dims():
    ours = bnlib.nn.GhostBatchNorm(3, 4)
    assert ours(torch.randn(9, 3, 2)).shape == (9, 3, 2)  # the last virtual batch has 2 values per channel


@pytest.mark.parametrize("shape, vbs", [((12, 3), 4), ((10, 3), 4), ((6, 3, 4, 2), 2)], ids=str)
@pytest.mark.parametrize("cfg", [dict(), dict(momentum=None)], ids=_ids)
def test_first_running_stats_are_batchnorm_on_the_first_virtual_batch(shape, vbs, cfg):
    """running_stats="first" (DDP's rank 0): the running estimates, over 3 steps, are
    torch BatchNorm's on input[:vbs]; outputs and gradients are the pooled mode's."""
    first = bnlib.nn.GhostBatchNorm(3, vbs, dtype=F64, running_stats="first", **cfg)
    pooled = bnlib.nn.GhostBatchNorm(3, vbs, dtype=F64, **cfg)
    rank0 = torch_bn_for_ndim(len(shape))(3, dtype=F64, **cfg)
    for step in range(3):
        x = random_input(shape, seed=step)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = first(x1), pooled(x2)
        rank0(x[:vbs])
        assert torch.equal(y1, y2)
        y1.square().sum().backward()
        y2.square().sum().backward()
        assert torch.equal(x1.grad, x2.grad)
        assert_close(first.running_mean, rank0.running_mean, STAT_TOL[F64], "running_mean")
        assert_close(first.running_var, rank0.running_var, STAT_TOL[F64], "running_var")
        assert first.num_batches_tracked.item() == rank0.num_batches_tracked.item() == step + 1
    assert "running_stats='first'" in repr(first) and "running_stats='" not in repr(pooled)
    assert not torch.allclose(first.running_var, pooled.running_var)


@pytest.mark.parametrize("value", ["all", "last", None, 1])
def test_bad_running_stats(value):
    with pytest.raises(ValueError, match="running_stats must be one of 'pooled', 'first', got"):
        bnlib.nn.GhostBatchNorm(3, 2, running_stats=value)


@pytest.mark.parametrize("vbs", [0, -2, 2.5, True, None, "4"])
def test_bad_virtual_batch_size(vbs):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnlib.nn.GhostBatchNorm(3, vbs)


def test_constructor_and_state_dict_like_batchnorm():
    params = list(inspect.signature(bnlib.nn.GhostBatchNorm.__init__).parameters)
    assert params == ["self", "num_features", "virtual_batch_size", "eps", "momentum", "affine",
                      "track_running_stats", "device", "dtype", "bias", "running_stats"]
    assert bnlib.nn.GhostBatchNorm(4, 2, bias=False).bias is None
    for kw in (dict(), dict(affine=False)):
        ghost = bnlib.nn.GhostBatchNorm(4, 2, **kw)
        assert "virtual_batch_size=2" in repr(ghost)
        bn = torch.nn.BatchNorm2d(4, **kw)
        with torch.no_grad():
            bn.running_mean.fill_(0.5)
        ghost.load_state_dict(bn.state_dict())
        assert list(ghost.state_dict()) == list(bn.state_dict())
        assert torch.equal(ghost.running_mean, bn.running_mean)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape, vbs", [((12, 3), 4), ((9, 3, 4, 2), 2)], ids=str)
def test_cuda_virtual_batches(shape, vbs):
    """On the GPU, both paths (equal virtual batches, and a short last one) against torch per chunk."""
    ours = bnlib.nn.GhostBatchNorm(3, vbs).cuda()
    x = random_input(shape, torch.float32).cuda().requires_grad_(True)
    y = ours(x)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    yr = torch.cat([F.batch_norm(c, None, None, training=True) for c in xr.split(vbs)])
    yr.sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    mu, var = _pooled(x.detach().double().cpu(), vbs)
    torch.testing.assert_close(ours.running_mean.cpu().double(), 0.1 * mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var.cpu().double(), 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [6, 7], ids=["equal", "uneven"])
def test_channels_last_input_keeps_its_layout(n):
    """As BatchNorm2d: a channels-last input gives a channels-last output,
    however many virtual batches it is cut into."""
    x = torch.randn(n, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    ghost = bnlib.nn.GhostBatchNorm(3, 2)
    y = ghost(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, bnlib.nn.GhostBatchNorm(3, 2)(x.contiguous()))


@pytest.mark.parametrize("batch", [4, 5], ids=["equal virtual batches", "a smaller last one"])
def test_non_reentrant_checkpoint_updates_once(batch):
    """The update follows the normalization, and the checkpoint's
    recomputation stops before it: one update and one count per step, the
    estimates of the same steps without a checkpoint (torch's BatchNorm,
    whose update is inside the op, updates again)."""
    from torch.utils.checkpoint import checkpoint

    results = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        layer = bnlib.nn.GhostBatchNorm(3, 2)
        for _ in range(3):
            x = torch.randn(batch, 3, 5, 5, requires_grad=True)
            y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
            y.sum().backward()
        results.append((layer.num_batches_tracked.item(), layer.running_mean.clone(), layer.running_var.clone()))
    (count, mean, var), (count_ckpt, mean_ckpt, var_ckpt) = results
    assert count == count_ckpt == 3
    torch.testing.assert_close(mean_ckpt, mean, rtol=0, atol=0)
    torch.testing.assert_close(var_ckpt, var, rtol=0, atol=0)
