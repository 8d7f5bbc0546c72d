"""bnlib.functional.batch_norm against torch.nn.functional.batch_norm.

Same signature, same outputs and gradients, running buffers updated in place
like torch; gradients checked against finite differences with
torch.autograd.gradcheck in float64, and the backward must be bnlib's own
hand-written autograd.Function, not torch's native batch norm backward.
Tolerances: helpers.OUT_TOL / GRAD_TOL / STAT_TOL (reasons there).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import bnlib.functional as BF
from helpers import GRAD_TOL, OUT_TOL, STAT_TOL, assert_close, random_affine, random_input

# Every test here runs on both CPU paths: the fused kernels and the tensor ops.
pytestmark = pytest.mark.usefixtures("each_cpu_path")


def test_signature_matches_torch():
    """Names, defaults and kinds match torch.nn.functional.batch_norm (annotations ignored)."""
    simple = lambda f: [  # noqa: E731
        (p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()
    ]
    assert simple(BF.batch_norm) == simple(F.batch_norm)


SHAPES = [(2, 1), (5, 3), (3, 2, 7), (2, 3, 4, 5), (3, 2, 2, 1, 3)]
AFFINE = ["none", "weight", "bias", "both"]


def _inputs(shape, dtype, affine, seed=0):
    c = shape[1]
    x = random_input(shape, dtype, seed=seed)
    w, b = random_affine(c, dtype, seed=seed + 1)
    w = w if affine in ("weight", "both") else None
    b = b if affine in ("bias", "both") else None
    rm = torch.linspace(-1, 1, c, dtype=dtype)
    rv = torch.linspace(0.5, 2, c, dtype=dtype)
    return x, w, b, rm, rv


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


MODES = [("train", 0.1), ("train", 0.7), ("train", 0.0), ("train", 1.0), ("train-no-stats", 0.1), ("eval", 0.1)]


@pytest.mark.parametrize("mode,momentum", MODES, ids=[f"{m}-{mo}" for m, mo in MODES])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch(shape, dtype, affine, mode, momentum):
    x, w, b, rm, rv = _inputs(shape, dtype, affine)
    training = mode != "eval"
    rm_o, rv_o = (None, None) if mode == "train-no-stats" else (rm.clone(), rv.clone())
    rm_t, rv_t = (None, None) if mode == "train-no-stats" else (rm.clone(), rv.clone())
    ptr = None if rm_o is None else (rm_o.data_ptr(), rv_o.data_ptr())
    xo, wo, bo = _leaf(x), _leaf(w), _leaf(b)
    xt, wt, bt = _leaf(x), _leaf(w), _leaf(b)
    yo = BF.batch_norm(xo, rm_o, rv_o, wo, bo, training, momentum, 1e-5)
    yt = F.batch_norm(xt, rm_t, rv_t, wt, bt, training, momentum, 1e-5)
    assert yo.dtype == yt.dtype and yo.shape == yt.shape
    assert_close(yo, yt, OUT_TOL[dtype], "output")
    if rm_o is not None:
        # updated in place: the very same tensors, with torch's new values
        assert (rm_o.data_ptr(), rv_o.data_ptr()) == ptr
        assert_close(rm_o, rm_t, STAT_TOL[dtype], "running_mean")
        assert_close(rv_o, rv_t, STAT_TOL[dtype], "running_var")
        if not training:
            assert torch.equal(rm_o, rm) and torch.equal(rv_o, rv), "eval must not touch the buffers"
    g = random_input(yt.shape, dtype, seed=42, spread=False)
    (yo * g).sum().backward()
    (yt * g).sum().backward()
    assert_close(xo.grad, xt.grad, GRAD_TOL[dtype], "input grad")
    for name, o, t in (("weight", wo, wt), ("bias", bo, bt)):
        if t is not None:
            assert o.grad is not None, f"{name}.grad is None"
            assert_close(o.grad, t.grad, GRAD_TOL[dtype], f"{name} grad")


def test_keyword_call_and_defaults():
    """Called with keywords and defaults (training=False, momentum=0.1, eps=1e-5), like torch."""
    x, w, b, rm, rv = _inputs((4, 3, 2), torch.float64, "both")
    y_o = BF.batch_norm(input=x, running_mean=rm.clone(), running_var=rv.clone(), weight=w, bias=b)
    y_t = F.batch_norm(input=x, running_mean=rm.clone(), running_var=rv.clone(), weight=w, bias=b)
    assert_close(y_o, y_t, OUT_TOL[torch.float64], "defaults (eval)")
    rm_o, rv_o, rm_t, rv_t = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    BF.batch_norm(x, rm_o, rv_o, training=True)
    F.batch_norm(x, rm_t, rv_t, training=True)
    assert_close(rm_o, rm_t, STAT_TOL[torch.float64], "default momentum")
    assert_close(rv_o, rv_t, STAT_TOL[torch.float64], "default momentum")


@pytest.mark.parametrize("eps", [1e-5, 1e-1, 3.0])
def test_eps(eps):
    x, w, b, rm, rv = _inputs((4, 3, 3), torch.float64, "both")
    for training in (True, False):
        y_o = BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, eps)
        y_t = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, eps)
        assert_close(y_o, y_t, OUT_TOL[torch.float64], f"eps={eps} training={training}")


def test_eval_single_sample_is_fine():
    """One value per channel is only an error when training."""
    x, w, b, rm, rv = _inputs((1, 3), torch.float64, "both")
    assert_close(
        BF.batch_norm(x, rm, rv, w, b, False), F.batch_norm(x, rm, rv, w, b, False), OUT_TOL[torch.float64], "N=1 eval"
    )


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2)], ids=str)
def test_empty_batch_like_torch(shape):
    """N=0 in training: torch returns an empty output and leaves the buffers alone."""
    x = torch.zeros(shape)
    rm_o, rv_o = torch.full((3,), 2.0), torch.full((3,), 3.0)
    rm_t, rv_t = rm_o.clone(), rv_o.clone()
    y_o = BF.batch_norm(x, rm_o, rv_o, torch.ones(3), torch.zeros(3), True)
    y_t = F.batch_norm(x, rm_t, rv_t, torch.ones(3), torch.zeros(3), True)
    assert y_o.shape == y_t.shape
    assert torch.equal(rm_o, rm_t) and torch.equal(rv_o, rv_t)


# --------------------------------------------------------------------------
# Gradients against finite differences (torch.autograd.gradcheck, float64):
# gradcheck's defaults (eps=1e-6, atol=1e-5, rtol=1e-3) are right for
# float64 central differences on O(1) functions.
# --------------------------------------------------------------------------
GC_SHAPES = [(4, 3), (3, 2, 5), (2, 3, 2, 2), (2, 2, 1, 2, 2)]


@pytest.mark.parametrize("affine", ["none", "both", "weight"])
@pytest.mark.parametrize("mode", ["train", "train-no-stats", "eval"])
@pytest.mark.parametrize("shape", GC_SHAPES, ids=str)
def test_gradcheck(shape, mode, affine):
    x, w, b, rm, rv = _inputs(shape, torch.float64, affine, seed=3)
    training = mode != "eval"
    use_stats = mode != "train-no-stats"
    leaves = [_leaf(x)] + [_leaf(t) for t in (w, b) if t is not None]

    def fn(*args):
        xx = args[0]
        rest = list(args[1:])
        ww = rest.pop(0) if w is not None else None
        bb = rest.pop(0) if b is not None else None
        # fresh buffer copies: the update must not feed back into later calls
        r_m = rm.clone() if use_stats else None
        r_v = rv.clone() if use_stats else None
        return BF.batch_norm(xx, r_m, r_v, ww, bb, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, tuple(leaves), check_undefined_grad=False)


def _walk(fn_node, seen=None):
    """All autograd nodes reachable from fn_node."""
    seen = set() if seen is None else seen
    stack = [fn_node]
    out = []
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        out.append(n)
        for nxt, _ in getattr(n, "next_functions", ()):
            stack.append(nxt)
    return out


def _is_bnlib_custom(node):
    """A node of a bnlib autograd Function: a Python one, or the C++ op's
    (``torch::autograd::CppNode<bnlib_cpu::BatchNormTrain>``)."""
    cls = getattr(node, "_forward_cls", None)
    if cls is None:
        return "CppNode<bnlib_cpu::" in node.name()
    return issubclass(cls, torch.autograd.Function) and cls.__module__.startswith("bnlib")


@pytest.mark.parametrize("use_stats", [True, False])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 2)], ids=str)
def test_backward_is_hand_written(shape, use_stats):
    """The graph from the output reaches the input only through a bnlib
    autograd.Function (a hand-written backward), never torch's native
    batch norm backward."""
    x, w, b, rm, rv = _inputs(shape, torch.float64, "both")
    xl, wl, bl = _leaf(x), _leaf(w), _leaf(b)
    y = BF.batch_norm(xl, rm.clone() if use_stats else None, rv.clone() if use_stats else None, wl, bl, True)
    nodes = _walk(y.grad_fn)
    names = [type(n).__name__ for n in nodes]
    assert not any("BatchNorm" in nm and not _is_bnlib_custom(n) for n, nm in zip(nodes, names)), names
    custom = [n for n in nodes if _is_bnlib_custom(n)]
    assert custom, f"no bnlib autograd.Function in the graph: {names}"
    assert all("Backward" in type(n).__name__ or "CppNode" in n.name() for n in custom)
    # walk again but stop at the custom nodes: x's AccumulateGrad must not be reachable
    seen = {id(n) for n in custom}
    outside = _walk(y.grad_fn, seen) if not _is_bnlib_custom(y.grad_fn) else []
    for n in outside:
        if type(n).__name__ == "AccumulateGrad":
            assert n.variable is not xl, (
                "the input's gradient flows around the custom Function (autograd replaying the forward): "
                + str([type(m).__name__ for m in outside])
            )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, fmt", [((2, 3, 4, 5), torch.channels_last),
                                        ((2, 3, 2, 4, 5), torch.channels_last_3d)], ids=["4d", "5d"])
def test_input_gradient_keeps_the_channels_last_layout(shape, fmt, training):
    """A channels-last input gets a channels-last dx even from a contiguous
    dy, in both modes, as from torch's native op."""
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    rm, rv = torch.zeros(3), torch.ones(3)
    dy = torch.randn(shape)
    for op in (BF.batch_norm, torch.nn.functional.batch_norm):
        y = op(x, rm.clone(), rv.clone(), torch.ones(3), torch.zeros(3), training)
        (dx,) = torch.autograd.grad(y, x, dy)
        assert dx.is_contiguous(memory_format=fmt), (op, dx.stride())


@pytest.mark.parametrize("path", ["kernels", "tensor_ops"])
def test_eps_below_float32s_smallest_normal_number(path):
    """eps = 1e-46 rounds to 0 in float32: a constant channel (variance 0)
    gave 0 * inf = NaN on the tensor-op path (and for bfloat16 input);
    torch and the C++ loops give 0."""
    x = torch.ones(4, 2)
    x[:, 1] = torch.arange(4.0)
    want = F.batch_norm(x, None, None, training=True, eps=1e-46)
    with BF.cpu_backend(path):
        for t in (x, x.bfloat16()):
            got = BF.batch_norm(t, None, None, training=True, eps=1e-46)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("eps", [1e-40, 1e-46])
def test_a_subnormal_eps_is_used_as_given(eps):
    """Values near 1e-20 have a variance near 1e-40, a subnormal float32 that
    an eps of 1e-40 is comparable to. The tensor ops lifted every eps below
    1.2e-38 (float32's smallest normal number) to it, and gave 0.17 where
    torch and the C++ loops give 1.16; now only an eps that rounds to 0
    is lifted, to the smallest subnormal number."""
    import bnlib.alternatives as alt

    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)) * 1e-20
    want = F.layer_norm(x, (5,), eps=eps)
    for path in ("kernels", "tensor_ops"):
        with BF.cpu_backend(path):
            torch.testing.assert_close(alt.layer_norm(x, (5,), eps=eps), want, rtol=1e-4, atol=1e-4)


def test_to_float64_keeps_float64_off_mps():
    """Folding and the population statistics compute in float64, which MPS does not have:
    for an MPS device they use the CPU (asked for here without an MPS device to run on)."""
    t = torch.arange(3.0, requires_grad=True)
    out = BF.to_float64(t, "mps")
    assert out.device.type == "cpu" and out.dtype == torch.float64 and not out.requires_grad
    assert BF.to_float64(t).device == t.device
    torch.testing.assert_close(out, t.detach().double())


def test_update_running_estimates_skips_a_channel_with_any_non_finite_statistic():
    """The public update (bnlib.sync_batchnorm.update_running_stats) takes
    statistics from its caller: a NaN mean beside a finite variance must not
    reach the buffers either."""
    from bnlib.functional import update_running_estimates

    nan, inf = float("nan"), float("inf")
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    update_running_estimates(running_mean, running_var, torch.tensor([nan, 1.0, 2.0, inf]),
                             torch.tensor([1.0, inf, 3.0, 1.0]), 0.5)
    assert torch.equal(running_mean, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(running_var, torch.tensor([1.0, 1.0, 2.0, 1.0]))
