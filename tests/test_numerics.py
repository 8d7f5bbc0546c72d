"""Numerics (contract, "Numerics").

* The variance is computed stably: float32 input with mean 1e4 and std 1
  gives a variance within 1e-3 (relative) of the float64 answer on the same
  data.  (E[x^2] - E[x]^2 in float32 loses everything: E[x^2] ~ 1e8 has an
  ulp of 8, larger than the variance itself.)
* float16 / bfloat16 input: statistics accumulate in float32, the output has
  the input's dtype.  A float32 module fed half input behaves as torch's does
  (output in the input dtype, float32 running stats); module.half() /
  .bfloat16() as a whole behaves as torch's too (half buffers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlib.functional as BF
import bnlib.nn
import bnlib.reference as R
from helpers import bnlib_bn_class, random_affine, torch_bn_class

# Every test here runs on both CPU paths: the fused kernels and the tensor ops.
pytestmark = pytest.mark.usefixtures("each_cpu_path")

MEAN, STD = 1e4, 1.0


def _big_mean_batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    # means 1e4, 1e4 + 3, 1e4 - 5, ...: channel-specific, all huge against std 1
    mu = MEAN + torch.tensor([0.0, 3.0, -5.0, 7.0][:c], dtype=torch.float64).view(view)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * STD + mu
    return x.to(torch.float32)


def _truth_var(x32, unbiased):
    x = x32.to(torch.float64)
    dims = [i for i in range(x.dim()) if i != 1]
    return x.var(dims, unbiased=unbiased)


@pytest.mark.parametrize("shape", [(2048, 3), (64, 3, 32), (32, 4, 8, 8), (8, 2, 4, 8, 8)], ids=str)
def test_nn_stable_variance_float32(shape):
    """momentum=1.0: running_var is exactly the batch's unbiased variance (rel. 1e-3 of float64)."""
    x = _big_mean_batch(shape)
    d = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    m = bnlib_bn_class(d)(shape[1], momentum=1.0)
    y = m(x)
    truth = _truth_var(x, unbiased=True)
    torch.testing.assert_close(m.running_var.double(), truth, rtol=1e-3, atol=0)
    # and the output (normalized with the biased variance) has variance
    # var/(var+eps) ~ 1: x - mu in float32 at 1e4 carries ~1e-3 absolute
    # error per element, so 1e-2 relative is the honest bound here.
    dims = [i for i in range(x.dim()) if i != 1]
    vb = _truth_var(x, unbiased=False)
    torch.testing.assert_close(y.double().var(dims, unbiased=False), vb / (vb + m.eps), rtol=1e-2, atol=0)
    torch.testing.assert_close(m.running_mean.double(), x.double().mean(dims), rtol=1e-6, atol=0)


def test_functional_stable_variance_float32():
    x = _big_mean_batch((256, 3, 16))
    rm, rv = torch.zeros(3), torch.ones(3)
    BF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rv.double(), _truth_var(x, unbiased=True), rtol=1e-3, atol=0)


def test_reference_stable_variance_float32():
    """The reference accepts float32; its variance is stable too (rel. 1e-3)."""
    x = _big_mean_batch((256, 3, 16))
    bn = R.BatchNorm(3, momentum=1.0)
    y = bn(x.numpy())
    truth = _truth_var(x, unbiased=True).numpy()
    np.testing.assert_allclose(np.asarray(bn.running_var, dtype=np.float64), truth, rtol=1e-3)
    vb = _truth_var(x, unbiased=False).numpy()
    np.testing.assert_allclose(np.asarray(y, dtype=np.float64).var(axis=(0, 2)), vb / (vb + 1e-5), rtol=1e-2)


def test_variance_not_collapsed_for_tiny_std():
    """Std 1e-2 on mean 1e4 in float32 (float32's ulp at 1e4 is ~1e-3): two-pass still
    gives the variance within 2% (the data itself is quantized at ~1e-3/1e-2 = 10%
    per value, but that error is in the data, common to both sides)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4096, 2, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    m = bnlib.nn.BatchNorm1d(2, momentum=1.0)
    m(x)
    torch.testing.assert_close(m.running_var.double(), _truth_var(x, unbiased=True), rtol=2e-2, atol=0)


# --------------------------------------------------------------------------
# Half precision
# --------------------------------------------------------------------------
# Tolerances against a float32 computation on the same (half) data: the
# output is rounded once to the low precision, half an ulp at |y| <= 4 is
# 2e-3 (float16) / 1.6e-2 (bfloat16); gradients likewise.
LOW = {
    torch.float16: dict(rtol=2e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=3e-2),
}
# A whole module in low precision also rounds weight, bias and the buffers.
LOW_WHOLE = {
    torch.float16: dict(rtol=4e-3, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=6e-2),
}
LOW_DTYPES = [torch.float16, torch.bfloat16]


def _half_batch(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # mean 3: a float16 running sum of 4096 such values would be ~1.2e4,
    # where float16's ulp is 8 -- accumulating in the low precision shows.
    return (torch.randn(shape, generator=g) + 3.0).to(dtype)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("d,shape", [(1, (512, 3)), (2, (64, 3, 8, 8)), (3, (8, 3, 4, 8, 8))], ids=str)
def test_float32_module_half_input(d, shape, dtype):
    """Like torch: a float32 module takes half input; output in the input dtype,
    buffers and parameter grads in float32, statistics accumulated in float32
    (running stats within 1e-4 of float64 on the same data; momentum=1.0)."""
    x = _half_batch(shape, dtype)
    ours = bnlib_bn_class(d)(3, momentum=1.0)
    ref = torch_bn_class(d)(3, momentum=1.0)
    w, b = random_affine(3, torch.float32)
    for m in (ours, ref):
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
    xo = x.clone().requires_grad_(True)
    xt = x.clone().requires_grad_(True)
    yo, yt = ours(xo), ref(xt)
    assert yo.dtype == dtype
    assert ours.running_mean.dtype == torch.float32 and ours.running_var.dtype == torch.float32
    # float32 truth on the same data
    x32 = x.float().requires_grad_(True)
    ref32 = torch_bn_class(d)(3, momentum=1.0)
    with torch.no_grad():
        ref32.weight.copy_(w)
        ref32.bias.copy_(b)
    y32 = ref32(x32)
    torch.testing.assert_close(yo.float(), y32.detach(), **LOW[dtype])
    torch.testing.assert_close(yo.float(), yt.float(), **LOW[dtype])
    dims = [i for i in range(x.dim()) if i != 1]
    x64 = x.double()
    torch.testing.assert_close(ours.running_mean.double(), x64.mean(dims), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_var.double(), x64.var(dims, unbiased=True), rtol=1e-4, atol=1e-5)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (yo * g).sum().backward()
    (yt * g).sum().backward()
    (y32 * g.float()).sum().backward()
    assert xo.grad.dtype == dtype
    assert ours.weight.grad.dtype == torch.float32 and ours.bias.grad.dtype == torch.float32
    torch.testing.assert_close(xo.grad.float(), x32.grad, **LOW[dtype])
    # parameter grads are float32 sums over many elements: 1e-3 relative
    torch.testing.assert_close(ours.weight.grad, ref32.weight.grad, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(ours.bias.grad, ref32.bias.grad, rtol=1e-3, atol=1e-2)
    # eval with half input: float32 buffers, half output
    ours.eval()
    ref32.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).float(), ref32(x.float()), **LOW[dtype])
        assert ours(x).dtype == dtype


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_whole_module_in_low_precision(dtype):
    """module.half()/.bfloat16(): everything in the low dtype, as torch; results close to float32."""
    shape = (32, 3, 4, 4)
    x = _half_batch(shape, dtype, seed=2)
    ours = bnlib.nn.BatchNorm2d(3).to(dtype)
    ref = torch.nn.BatchNorm2d(3).to(dtype)
    ref32 = torch.nn.BatchNorm2d(3)
    yo = ours(x)
    yt = ref(x)
    y32 = ref32(x.float())
    assert yo.dtype == dtype
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(ours, name).dtype == getattr(ref, name).dtype, name
    torch.testing.assert_close(yo.float(), y32.detach(), **LOW_WHOLE[dtype])
    torch.testing.assert_close(yo.float(), yt.float(), **LOW_WHOLE[dtype])
    # buffers hold float32-accurate statistics rounded to the low dtype
    torch.testing.assert_close(ours.running_mean.float(), ref32.running_mean, **LOW_WHOLE[dtype])
    torch.testing.assert_close(ours.running_var.float(), ref32.running_var, **LOW_WHOLE[dtype])
    ours.eval()
    ref32.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).float(), ref32(x.float()), **LOW_WHOLE[dtype])


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_functional_half_input(dtype, training):
    """F.batch_norm-style call with half input and float32 buffers/params, as torch allows."""
    x = _half_batch((256, 3, 8), dtype, seed=4)
    w, b = random_affine(3, torch.float32)
    rm_o, rv_o = torch.tensor([3.0, 2.5, 3.5]), torch.tensor([1.0, 0.8, 1.2])
    rm_t, rv_t = rm_o.clone(), rv_o.clone()
    yo = BF.batch_norm(x, rm_o, rv_o, w, b, training, 0.5, 1e-5)
    yt = torch.nn.functional.batch_norm(x.float(), rm_t, rv_t, w, b, training, 0.5, 1e-5)
    assert yo.dtype == dtype
    assert rm_o.dtype == torch.float32
    torch.testing.assert_close(yo.float(), yt, **LOW[dtype])
    # statistics accumulate in float32: buffers match the float32 computation closely
    torch.testing.assert_close(rm_o, rm_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv_o, rv_t, rtol=1e-4, atol=1e-5)


HALF_MODULES = {
    "BatchNorm1d": lambda: bnlib.nn.BatchNorm1d(3),
    "BatchRenorm1d": lambda: bnlib.nn.BatchRenorm1d(3),
    "SyncBatchNorm": lambda: bnlib.nn.SyncBatchNorm(3),
    "GhostBatchNorm": lambda: bnlib.nn.GhostBatchNorm(3, 2),
    "InstanceNorm1d": lambda: bnlib.nn.InstanceNorm1d(3, track_running_stats=True),
}


@pytest.mark.parametrize("name", HALF_MODULES)
def test_half_buffers_average_before_rounding(name):
    """module.half() fed a finite batch whose unbiased variance (~9e4) is above
    float16's largest value (65504): the running variance is averaged in
    float32 and rounded once, as torch does (0.9 * 1 + 0.1 * 9e4 ~ 9e3), not
    rounded to inf first (which made it inf, then NaN)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 3, 4, generator=g) * 300).half()
    if name != "InstanceNorm1d":
        x = x[:, :, 0]
    ours = HALF_MODULES[name]().half()
    for _ in range(2):
        ours(x)
    assert torch.isfinite(ours.running_var).all(), ours.running_var
    assert (ours.running_var > 5000).all(), ours.running_var
    if name in ("BatchNorm1d", "SyncBatchNorm"):
        ref = torch.nn.BatchNorm1d(3).half()
        for _ in range(2):
            ref(x)
        torch.testing.assert_close(ours.running_var.float(), ref.running_var.float(), rtol=2e-3, atol=0)
        torch.testing.assert_close(ours.running_mean.float(), ref.running_mean.float(), rtol=2e-3, atol=0.05)
    ours.eval()
    with torch.no_grad():
        assert torch.isfinite(ours(x)).all()


@pytest.mark.parametrize("cls", [bnlib.nn.BatchNorm1d, bnlib.nn.BatchRenorm1d], ids=lambda c: c.__name__)
def test_stable_variance_float32_with_many_rows(cls):
    """The contract's 1e-3 holds for any batch size: 2^21 rows of (N, C)
    input, where adding the squares in order (BLAS) was 1.4e-3 off."""
    g = torch.Generator().manual_seed(3)
    x = (MEAN + STD * torch.randn(2**21, 2, generator=g, dtype=torch.float64)).float()
    truth = x.double().var(0, unbiased=True)
    module = cls(2, momentum=1.0)  # running_var = the unbiased batch variance
    module(x)
    assert float(((module.running_var.double() - truth).abs() / truth).max()) < 1e-4


@pytest.mark.parametrize("momentum", [1.0, None])
def test_running_var_takes_a_tiny_batch_variance_whole(momentum):
    """With the factor 1 (momentum 1, or the first batch of the cumulative
    average) the running variance IS the batch's unbiased variance, however
    small next to the initial 1, as in torch."""
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(4)) * 1e-4
    ours, ref = bnlib.nn.BatchNorm1d(3, momentum=momentum), torch.nn.BatchNorm1d(3, momentum=momentum)
    ours(x), ref(x)
    truth = x.double().var(0)
    for got in (ours.running_var, ref.running_var):
        assert float(((got.double() - truth) / truth).abs().max()) < 1e-6
