"""bnlib on CUDA against torch's native (cuDNN) batch norm on CUDA.

Every test is marked `cuda` and skipped without a GPU.
Tolerances: float32 as helpers.OUT_TOL/GRAD_TOL/STAT_TOL (a different
reduction order on the GPU, still ~1e-6 relative); float16/bfloat16 against a
float32 computation on the same data, half an ulp of the low dtype at |y|<=4
(see test_numerics.py, the same numbers).
"""

from __future__ import annotations

import copy

import pytest
import torch

import bnlib.functional as BF
import bnlib.nn
from helpers import (
    GRAD_TOL,
    OUT_TOL,
    STAT_TOL,
    assert_close,
    assert_same_buffers,
    random_affine,
    random_input,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


@pytest.fixture(autouse=True, params=["default-path", "torch-ops-path"])
def cuda_path(request, monkeypatch):
    """Run every test twice: bnlib's default CUDA path (its Triton kernels when
    Triton is importable) and its plain tensor-ops path (Triton switched off).
    The switch is bnlib.functional._triton_path, an internal hook; without it
    there is a single path and the second run is skipped."""
    if request.param == "torch-ops-path":
        if not hasattr(BF, "_triton_path"):
            pytest.skip("bnlib has a single CUDA path")
        monkeypatch.setattr(BF, "_triton_path", lambda: None)
    return request.param
LOW = {
    torch.float16: dict(rtol=2e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=3e-2),
}


def _pair(c, dtype=torch.float32, **kw):
    ours = bnlib.nn.BatchNorm2d(c, device=DEV, dtype=dtype, **kw)
    ref = torch.nn.BatchNorm2d(c, device=DEV, dtype=dtype, **kw)
    w, b = random_affine(c, dtype)
    for m in (ours, ref):
        if m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(w)
                m.bias.copy_(b)
    return ours, ref


def _param_grad_truth(x, g, mean, var, eps):
    """dgamma = sum(dy * x_hat), dbeta = sum(dy) in float64 on the same data.

    torch's own CUDA kernels are not the truth for these in low precision:
    on torch 2.11 + cuDNN, bfloat16 input gives parameter gradients off by
    ~3e-3 relative (seen on an H100), so they are checked against float64.
    """
    dims = [0] + list(range(2, x.dim()))
    view = [1, -1] + [1] * (x.dim() - 2)
    x64, g64 = x.double(), g.double()
    if mean is None:
        mean, var = x64.mean(dims), x64.var(dims, unbiased=False)
    x_hat = (x64 - mean.double().view(view)) / torch.sqrt(var.double().view(view) + eps)
    return (g64 * x_hat).sum(dims), g64.sum(dims)


def _step(ours, ref, x, tol_out, tol_grad, seed):
    use_batch = ours.training or ours.running_mean is None
    stats = (None, None) if use_batch else (ref.running_mean.clone(), ref.running_var.clone())
    xo = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    yo, yr = ours(xo), ref(xr)
    assert yo.device.type == "cuda" and yo.dtype == yr.dtype
    assert_close(yo.float(), yr.float(), tol_out, "output")
    g = random_input(tuple(x.shape), torch.float32, seed=seed, spread=False).to(DEV, x.dtype)
    (yo * g).sum().backward()
    (yr * g).sum().backward()
    assert xo.grad.dtype == xr.grad.dtype
    assert_close(xo.grad.float(), xr.grad.float(), tol_grad, "input grad")
    if ours.weight is not None:
        dw, db = _param_grad_truth(x, g, *stats, ours.eps)
        # float32 sums of <= 1e3 terms of size <= ~10: 1e-4 relative, 1e-3 absolute
        for name, truth in (("weight", dw), ("bias", db)):
            p = getattr(ours, name)
            assert p.grad.dtype == getattr(ref, name).grad.dtype
            assert_close(p.grad.double(), truth, dict(rtol=1e-4, atol=1e-3), f"{name}.grad vs float64")
            if x.dtype == torch.float32:
                assert_close(p.grad, getattr(ref, name).grad, dict(rtol=1e-4, atol=1e-4), f"{name}.grad vs torch")
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cfg", [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (8, 4, 7, 7), (2, 1, 1, 2)], ids=str)
def test_bn2d_float32_vs_native(shape, cfg):
    ours, ref = _pair(shape[1], **cfg)
    for s in range(3):
        x = random_input(shape, torch.float32, seed=s).to(DEV)
        _step(ours, ref, x, OUT_TOL[torch.float32], GRAD_TOL[torch.float32], seed=s)
        assert_same_buffers(ours, ref, torch.float32)
    ours.eval()
    ref.eval()
    x = random_input(shape, torch.float32, seed=9).to(DEV) * 2 + 1
    _step(ours, ref, x, OUT_TOL[torch.float32], GRAD_TOL[torch.float32], seed=9)
    assert_same_buffers(ours, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bn2d_half_input_vs_native(dtype):
    """float32 module, half input (as torch allows): half output, float32 stats."""
    shape = (16, 3, 8, 8)
    ours, ref = _pair(3)
    for s in range(3):
        x = (random_input(shape, torch.float32, seed=s) + 3).to(DEV, dtype)
        _step(ours, ref, x, LOW[dtype], {k: 2 * v for k, v in LOW[dtype].items()}, seed=s)
        assert ours.running_mean.dtype == torch.float32
        # the stats come from float32 accumulation on both sides: 1e-4 relative
        assert_close(ours.running_mean, ref.running_mean, dict(rtol=1e-4, atol=1e-5), "running_mean")
        assert_close(ours.running_var, ref.running_var, dict(rtol=1e-4, atol=1e-5), "running_var")
        assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bn2d_whole_low_precision_module(dtype):
    ours, ref = _pair(3, dtype=dtype)
    x = (random_input((16, 3, 4, 4), torch.float32, seed=1) + 3).to(DEV, dtype)
    yo, yr = ours(x), ref(x)
    assert yo.dtype == dtype and ours.running_var.dtype == ref.running_var.dtype
    tol = {k: 2 * v for k, v in LOW[dtype].items()}
    assert_close(yo.float(), yr.float(), tol, "output")
    assert_close(ours.running_var.float(), ref.running_var.float(), tol, "running_var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_functional_vs_native(dtype, training):
    shape = (8, 3, 5, 5)
    x = (random_input(shape, torch.float32, seed=2) + 1).to(DEV, dtype)
    w, b = (t.to(DEV) for t in random_affine(3, torch.float32))
    rm_o = torch.tensor([0.5, 1.0, 1.5], device=DEV)
    rv_o = torch.tensor([1.0, 2.0, 0.5], device=DEV)
    rm_t, rv_t = rm_o.clone(), rv_o.clone()
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    wo, wt = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    yo = BF.batch_norm(xo, rm_o, rv_o, wo, b, training, 0.2, 1e-5)
    yt = torch.nn.functional.batch_norm(xt, rm_t, rv_t, wt, b, training, 0.2, 1e-5)
    assert yo.dtype == dtype
    tol = OUT_TOL[torch.float32] if dtype == torch.float32 else LOW[dtype]
    assert_close(yo.float(), yt.float(), tol, "output")
    assert_close(rm_o, rm_t, dict(rtol=1e-4, atol=1e-5), "running_mean")
    assert_close(rv_o, rv_t, dict(rtol=1e-4, atol=1e-5), "running_var")
    g = torch.ones_like(yo).mul_(0.5).add_(xo.detach() * 0.1)
    (yo * g).sum().backward()
    (yt * g).sum().backward()
    gtol = GRAD_TOL[torch.float32] if dtype == torch.float32 else {k: 2 * v for k, v in LOW[dtype].items()}
    assert_close(xo.grad.float(), xt.grad.float(), gtol, "input grad")
    stats = (None, None) if training else (torch.tensor([0.5, 1.0, 1.5], device=DEV), torch.tensor([1.0, 2.0, 0.5], device=DEV))
    dw, _ = _param_grad_truth(x, g, *stats, 1e-5)
    # against float64, not torch (see _param_grad_truth): 1e-4 relative, 1e-3 absolute
    assert_close(wo.grad.double(), dw, dict(rtol=1e-4, atol=1e-3), "weight grad vs float64")
    if dtype == torch.float32:
        assert_close(wo.grad, wt.grad, dict(rtol=1e-4, atol=1e-4), "weight grad vs torch")


@pytest.mark.parametrize("training", [True, False])
def test_functional_gradcheck_cuda(training):
    """float64 finite differences on the GPU (gradcheck defaults, see test_functional.py)."""
    x = random_input((3, 2, 2, 2), torch.float64, seed=3).to(DEV).requires_grad_(True)
    w, b = (t.to(DEV).requires_grad_(True) for t in random_affine(2, torch.float64))
    rm = torch.tensor([0.1, -0.2], dtype=torch.float64, device=DEV)
    rv = torch.tensor([1.5, 0.7], dtype=torch.float64, device=DEV)

    def fn(x, w, b):
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_to_cuda_and_state_dict_round_trip():
    """Train on CPU, move to CUDA (.to('cuda')), keep training against torch;
    state dicts cross devices and libraries (strict=True)."""
    ours = bnlib.nn.BatchNorm2d(3)
    ref = torch.nn.BatchNorm2d(3)
    for s in range(2):
        x = random_input((4, 3, 3, 3), torch.float32, seed=s)
        ours(x), ref(x)
    assert ours.to(DEV) is ours
    ref.to(DEV)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(ours, name).device.type == "cuda", name
    x = random_input((4, 3, 3, 3), torch.float32, seed=5).to(DEV)
    _step(ours, ref, x, OUT_TOL[torch.float32], GRAD_TOL[torch.float32], seed=5)
    assert_same_buffers(ours, ref, torch.float32)
    # bnlib (cuda) -> torch (cpu) and torch (cuda) -> bnlib (cpu), strict
    t_cpu = torch.nn.BatchNorm2d(3)
    t_cpu.load_state_dict(ours.state_dict(), strict=True)
    o_cpu = bnlib.nn.BatchNorm2d(3)
    o_cpu.load_state_dict(ref.state_dict(), strict=True)
    o_dev = copy.deepcopy(o_cpu).to(DEV)
    for m in (t_cpu, o_cpu, o_dev, ours, ref):
        m.eval()
    xe = random_input((2, 3, 3, 3), torch.float32, seed=6)
    y = ref(xe.to(DEV)).cpu()
    for name, m, inp in (("torch cpu", t_cpu, xe), ("bnlib cpu", o_cpu, xe), ("bnlib cuda", o_dev, xe.to(DEV))):
        assert_close(m(inp).detach().cpu(), y.detach(), OUT_TOL[torch.float32], name)
    # device= kwarg
    m = bnlib.nn.BatchNorm2d(3, device=DEV)
    assert m.running_mean.device.type == "cuda" and m.num_batches_tracked.device.type == "cuda"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
def test_nan_rule_cuda(value):
    """NaN/Inf in channel k: its running stats exactly unchanged, the others as torch on a clean batch."""
    dtype = torch.float32
    k = 1
    ours = bnlib.nn.BatchNorm2d(3, device=DEV)
    ref = torch.nn.BatchNorm2d(3, device=DEV)
    x0 = random_input((4, 3, 3, 3), dtype, seed=0).to(DEV)
    ours(x0), ref(x0)
    rm0, rv0 = ours.running_mean.clone(), ours.running_var.clone()
    clean = random_input((4, 3, 3, 3), dtype, seed=1).to(DEV)
    bad = clean.clone()
    bad[2, k, 1, 1] = value
    y = ours(bad)
    ref(clean)
    assert torch.isnan(y[:, k]).all()
    assert torch.equal(ours.running_mean[k], rm0[k]) and torch.equal(ours.running_var[k], rv0[k])
    o = [0, 2]
    assert_close(ours.running_mean[o], ref.running_mean[o], STAT_TOL[dtype], "running_mean")
    assert_close(ours.running_var[o], ref.running_var[o], STAT_TOL[dtype], "running_var")


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_training_forward_without_host_sync(functional):
    """The NaN rule (and the whole training forward) runs without a host sync:
    under torch.cuda.set_sync_debug_mode("error") a synchronizing call
    (.item(), bool(tensor), nonzero, a blocking copy) raises. torch's own
    native module is the control: if it syncs here too, the check is moot."""
    x = random_input((4, 3, 3, 3), torch.float32, seed=0).to(DEV)
    x[0, 1, 0, 0] = float("nan")
    ref = torch.nn.BatchNorm2d(3, device=DEV)
    ours = bnlib.nn.BatchNorm2d(3, device=DEV)
    rm = torch.zeros(3, device=DEV)
    rv = torch.ones(3, device=DEV)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        try:
            ref(x)
        except RuntimeError as e:  # pragma: no cover - depends on torch
            pytest.skip(f"torch's native module syncs here too: {e}")
        if functional:
            y = BF.batch_norm(x, rm, rv, training=True)
        else:
            y = ours(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isnan(y[:, 1]).all()
    stats = (rm, rv) if functional else (ours.running_mean, ours.running_var)
    assert stats[0][1].item() == 0.0 and stats[1][1].item() == 1.0
    assert torch.isfinite(stats[0]).all() and torch.isfinite(stats[1]).all()


CUDA_SHAPES = [(4096, 5), (7, 3, 129), (32, 64, 16, 16), (7, 5, 13, 11), (3, 4, 5, 6, 7), (2, 1, 1, 1, 2)]


@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_bn_many_shapes_vs_native(shape):
    """BatchNorm1d/2d/3d, odd and larger sizes (several blocks per channel in a
    fused kernel), float32, train then eval: outputs, grads, running stats."""
    d = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    cls_o = {1: bnlib.nn.BatchNorm1d, 2: bnlib.nn.BatchNorm2d, 3: bnlib.nn.BatchNorm3d}[d]
    cls_t = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[d]
    ours, ref = cls_o(shape[1], device=DEV), cls_t(shape[1], device=DEV)
    tol = OUT_TOL[torch.float32]
    for s in range(2):
        x = (random_input(shape, torch.float32, seed=s) * 3 + 5).to(DEV)
        _step(ours, ref, x, tol, GRAD_TOL[torch.float32], seed=s)
        assert_same_buffers(ours, ref, torch.float32)
    ours.eval()
    ref.eval()
    _step(ours, ref, random_input(shape, torch.float32, seed=7).to(DEV), tol, GRAD_TOL[torch.float32], seed=7)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_input_cuda(layout, dtype):
    base = (random_input((8, 6, 10, 12), torch.float32, seed=3) + 2).to(DEV, dtype)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[:, :, 1::2, ::3]
    else:
        x = base.transpose(2, 3)
    assert not x.is_contiguous()
    ours, ref = _pair(6)
    tol = OUT_TOL[torch.float32] if dtype == torch.float32 else LOW[dtype]
    gtol = GRAD_TOL[torch.float32] if dtype == torch.float32 else {k: 2 * v for k, v in LOW[dtype].items()}
    _step(ours, ref, x, tol, gtol, seed=4)
    assert_close(ours.running_var, ref.running_var, dict(rtol=1e-4, atol=1e-5), "running_var")


@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (2, 3, 0, 2)], ids=str)
def test_empty_batch_cuda(shape):
    """As torch on CUDA: empty output, running mean/var untouched, counter incremented."""
    ours, ref = _pair(3)
    x0 = random_input((4, 3, 2, 2), torch.float32, seed=0).to(DEV)
    ours(x0), ref(x0)
    xo = torch.zeros(shape, device=DEV, requires_grad=True)
    xr = torch.zeros(shape, device=DEV, requires_grad=True)
    yo, yr = ours(xo), ref(xr)
    assert yo.shape == yr.shape
    assert_same_buffers(ours, ref, torch.float32)
    yo.sum().backward()
    yr.sum().backward()
    assert xo.grad.shape == xr.grad.shape
    for name in ("weight", "bias"):
        assert torch.equal(getattr(ours, name).grad, getattr(ref, name).grad), name


@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_alternatives_under_autocast_as_torch(name, dtype):
    """Under CUDA autocast torch runs layer, group and RMS norm in float32
    (its float32 op list); bnlib's return the same dtype and values."""
    import torch.nn.functional as F

    from bnlib import alternatives as alt

    calls = {
        "layer_norm": (lambda f, x, w, b: f(x, (16,), w, b), F.layer_norm, alt.layer_norm),
        "group_norm": (lambda f, x, w, b: f(x, 4, w, b), F.group_norm, alt.group_norm),
        "rms_norm": (lambda f, x, w, b: f(x, (16,), w), F.rms_norm, alt.rms_norm),
    }
    call, theirs, ours = calls[name]
    x = torch.randn(8, 16, 16, device=DEV).to(dtype)
    w, b = torch.rand(16, device=DEV) + 0.5, torch.randn(16, device=DEV)
    with torch.autocast("cuda", dtype=dtype):
        expected, got = call(theirs, x, w, b), call(ours, x, w, b)
    assert got.dtype == expected.dtype
    assert_close(got, expected, OUT_TOL[torch.float32], name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_lazy_batch_norm_on_cuda_matches_torch(channels_last):
    """A LazyBatchNorm2d made on the GPU becomes a bnlib BatchNorm2d there,
    with torch's outputs, gradients and running statistics."""
    ours = bnlib.nn.LazyBatchNorm2d(device=DEV)
    ref = torch.nn.LazyBatchNorm2d(device=DEV)
    x = random_input((8, 16, 6, 6), torch.float32, seed=3).to(DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yo, yr = ours(xo), ref(xr)
    assert type(ours) is bnlib.nn.BatchNorm2d and ours.weight.device.type == torch.device(DEV).type
    assert_close(yo, yr, OUT_TOL[torch.float32], "y")
    assert_same_buffers(ours, ref, torch.float32)
    dy = torch.randn_like(yo)
    yo.backward(dy)
    yr.backward(dy)
    assert_close(xo.grad, xr.grad, GRAD_TOL[torch.float32], "dx")


def test_tent_step_on_cuda():
    """TENT on the GPU: only gamma and beta move, and the step's logits are
    those of the forward pass before it."""
    from bnlib import adaptation

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), bnlib.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3)).to(DEV)
    params = adaptation.configure_tent(model)
    frozen = [p.detach().clone() for p in (model[0].weight, model[3].weight)]
    adapted = [p.detach().clone() for p in params]
    x = torch.randn(16, 6, device=DEV)
    with torch.no_grad():
        want = model(x)
    logits = adaptation.tent_step(model, x, torch.optim.SGD(params, lr=0.5))
    assert torch.equal(logits, want)
    assert all(torch.equal(p, f) for p, f in zip((model[0].weight, model[3].weight), frozen))
    assert not any(torch.equal(p, a) for p, a in zip(params, adapted))


def test_conditional_batchnorm_on_cuda():
    """Conditional BN on the GPU: output, gradients and running statistics as on the CPU."""
    torch.manual_seed(0)
    cpu = bnlib.nn.ConditionalBatchNorm2d(4, 3)
    with torch.no_grad():
        cpu.weight.normal_()
        cpu.bias.normal_()
    gpu = copy.deepcopy(cpu).to(DEV)
    x = torch.randn(6, 4, 5, 5)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    xc, xg = x.clone().requires_grad_(True), x.to(DEV).requires_grad_(True)
    yc, yg = cpu(xc, labels), gpu(xg, labels.to(DEV))
    assert_close(yg.cpu(), yc, OUT_TOL[torch.float32], "y")
    dy = torch.randn_like(yc)
    yc.backward(dy)
    yg.backward(dy.to(DEV))
    assert_close(xg.grad.cpu(), xc.grad, GRAD_TOL[torch.float32], "dx")
    assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, GRAD_TOL[torch.float32], "dweight")
    assert_close(gpu.norm.running_var.cpu(), cpu.norm.running_var, OUT_TOL[torch.float32], "running_var")


def test_statistics_and_folding_on_cuda():
    """The population statistics, pooled precise BN and folding on the GPU: the same
    numbers as on the CPU (each batch summarized on its device in float32, merged in
    float64 on the host; the fold in float64 on the device)."""
    from bnlib import fold
    from bnlib import moving_average as ma

    torch.manual_seed(0)
    cpu = torch.nn.Sequential(torch.nn.Linear(6, 8), bnlib.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 3))
    gpu = copy.deepcopy(cpu).to(DEV)
    batches = [3 + torch.randn(16, 6) for _ in range(4)]
    for (mean_c, var_c), (mean_g, var_g) in zip(ma.population_statistics(cpu, batches),
                                                ma.population_statistics(gpu, [b.to(DEV) for b in batches])):
        assert mean_g.device.type == "cuda" and mean_g.dtype == torch.float64
        torch.testing.assert_close(mean_g.cpu(), mean_c, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var_g.cpu(), var_c, rtol=1e-5, atol=1e-6)
    ma.precise_bn(cpu, batches, estimator="pooled")
    ma.precise_bn(gpu, [b.to(DEV) for b in batches], estimator="pooled")
    assert_close(gpu[1].running_var.cpu(), cpu[1].running_var, STAT_TOL[torch.float32], "running_var")
    folded = fold.fold_model(gpu.eval())
    x = batches[0].to(DEV)
    with torch.no_grad():
        assert_close(folded(x).cpu(), gpu(x).cpu(), OUT_TOL[torch.float32], "folded")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_input_on_another_gpu_than_the_current_one():
    """A layer and its input on cuda:1 while cuda:0 is current: Triton launches on
    the current device, so bnlib makes the input's device current first."""
    torch.manual_seed(0)
    ours = bnlib.nn.BatchNorm2d(3).to("cuda:1")
    ref = torch.nn.BatchNorm2d(3).to("cuda:1")
    x = torch.randn(4, 3, 5, 5, device="cuda:1", requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    with torch.cuda.device(0):
        y, yr = ours(x), ref(xr)
        dy = torch.randn_like(y)
        y.backward(dy)
        yr.backward(dy)
    assert_close(y, yr, OUT_TOL[torch.float32], "y")
    assert_close(x.grad, xr.grad, GRAD_TOL[torch.float32], "dx")
    assert_same_buffers(ours, ref, torch.float32)
