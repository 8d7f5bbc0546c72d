"""bnlib's fused CPU kernels (bnlib/csrc/batch_norm_cpu.cpp, bnlib.cpu_kernels).

Every layout the kernels walk (planes, rows, channels-last 4D and 5D, a
strided input copied first), both dtypes and every combination of affine
parameters, against torch's native op and bnlib's tensor-op path; gradcheck
through them; the contract's numerics (mean 1e4 in float32) on both layouts;
thread counts; the NaN rule; and the fall-back when they cannot be built.
The rest of the suite runs on both CPU paths (conftest's ``each_cpu_path``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bnlib.functional as BF
import bnlib.nn as bnn
from bnlib import cpu_kernels
from helpers import random_affine, random_input

pytestmark = pytest.mark.skipif(not cpu_kernels.is_available(), reason="bnlib's CPU kernels could not be built here")

REPO = Path(__file__).resolve().parent.parent

LAYOUTS = {
    "(N,C)": lambda: random_input((37, 5), torch.float64, seed=1),
    "(N,C) one row block + tail": lambda: random_input((131, 3), torch.float64, seed=2),
    "(N,C,L)": lambda: random_input((6, 4, 7), torch.float64, seed=3),
    "NCHW": lambda: random_input((5, 3, 4, 6), torch.float64, seed=4),
    "NHWC": lambda: random_input((5, 3, 4, 6), torch.float64, seed=5).to(memory_format=torch.channels_last),
    "NCDHW": lambda: random_input((3, 4, 2, 3, 5), torch.float64, seed=6),
    "NDHWC": lambda: random_input((3, 4, 2, 3, 5), torch.float64, seed=7).to(memory_format=torch.channels_last_3d),
    "strided (transposed)": lambda: random_input((6, 3, 5, 4), torch.float64, seed=8).transpose(2, 3),
    "N=1, spatial": lambda: random_input((1, 3, 4, 5), torch.float64, seed=9),
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def run(impl, x, weight, bias, training, dy):
    """Forward and backward of one implementation; outputs, grads, running stats."""
    x = x.detach().clone().requires_grad_()
    w = None if weight is None else weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    c = x.shape[1]
    rm = torch.linspace(-1, 1, c, dtype=x.dtype)
    rv = torch.linspace(0.5, 2, c, dtype=x.dtype)
    y = impl(x, rm, rv, w, b, training, 0.1, 1e-5)
    y.backward(dy)
    grads = [t.grad for t in (x, w, b) if t is not None]
    return [y, *grads, rm, rv]


def both_paths(x, weight, bias, training, dy):
    with BF.cpu_backend("kernels"):
        ours = run(BF.batch_norm, x, weight, bias, training, dy)
    with BF.cpu_backend("tensor_ops"):
        tensor_ops = run(BF.batch_norm, x, weight, bias, training, dy)
    native = run(F.batch_norm, x, weight, bias, training, dy)
    return ours, tensor_ops, native


@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kernels_match_native_and_tensor_ops(layout, dtype, training, affine):
    x = LAYOUTS[layout]().to(dtype)
    weight, bias = random_affine(x.shape[1], dtype)
    weight = weight if "weight" in affine else None
    bias = bias if "bias" in affine else None
    dy = random_input(x.shape, dtype, seed=77, spread=False)
    ours, tensor_ops, native = both_paths(x, weight, bias, training, dy)
    for a, b, n in zip(ours, tensor_ops, native):
        torch.testing.assert_close(a, n, **TOL[dtype])
        torch.testing.assert_close(a, b, **TOL[dtype])
    y = ours[0]
    assert y.dtype == x.dtype
    if x.dim() >= 4 and not x.is_contiguous():
        # y keeps the input's memory format, as torch's op does
        assert y.stride() == native[0].stride()


def test_kernels_are_used_and_tensor_ops_are_not():
    """The CPU path really is the kernels: one custom op per direction."""
    from bnlib import perf

    x = random_input((8, 3, 4, 4), torch.float32, seed=1).requires_grad_()
    w, b = (t.requires_grad_() for t in random_affine(3, torch.float32))
    with BF.cpu_backend("kernels"):
        y, fwd_ops = perf.op_traffic(BF.batch_norm, x, torch.zeros(3), torch.ones(3), w, b, True)
        _, bwd_ops = perf.op_traffic(y.backward, torch.ones_like(y))
    fwd_names = [op for op, *_ in perf.traffic_table(fwd_ops, x.numel() * 4)]
    bwd_names = [op for op, *_ in perf.traffic_table(bwd_ops, x.numel() * 4)]
    assert fwd_names == ["batch_norm_forward.default", "total"], fwd_names  # running update included
    assert bwd_names[0] == "batch_norm_backward.default", bwd_names


def test_gradcheck_through_the_kernels():
    """Finite differences in float64, for input, weight and bias at once."""
    x = random_input((6, 3, 2, 2), torch.float64, seed=3).requires_grad_()
    w, b = (t.requires_grad_() for t in random_affine(3, torch.float64))
    with BF.cpu_backend("kernels"):
        assert torch.autograd.gradcheck(lambda *a: BF.batch_norm(a[0], None, None, a[1], a[2], True), (x, w, b))
        xr = random_input((9, 4), torch.float64, seed=4).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: BF.batch_norm(t, None, None, None, None, True), (xr,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_split_ops_of_synchronized_batch_norm(layout, dtype):
    """The three pieces SyncBatchNorm calls between its collectives, against
    their formulas in float64: batch_norm_stats -> (mean, M2), and
    batch_norm_backward_reduce -> (sum dy, sum dy (x - mean)), and
    batch_norm_backward_elemt -> k dy + a (x - mean) + b, in x's layout."""
    x = BF._dense(LAYOUTS[layout]().to(dtype))
    dy = BF._dense_like(random_input(x.shape, dtype, seed=11, spread=False), x)
    dims = [0] + list(range(2, x.dim()))
    ops, x64, dy64 = cpu_kernels.ops(), x.double(), dy.double()
    per_channel = [1, -1] + [1] * (x.dim() - 2)

    mean, m2 = ops.batch_norm_stats(x)
    true_mean = x64.mean(dims)
    torch.testing.assert_close(mean.double(), true_mean, **TOL[dtype])
    torch.testing.assert_close(m2.double(), ((x64 - true_mean.view(per_channel)) ** 2).sum(dims), **TOL[dtype])

    sum_dy, sum_dy_xc = ops.batch_norm_backward_reduce(dy, x, mean)
    centered = x64 - mean.double().view(per_channel)
    torch.testing.assert_close(sum_dy.double(), dy64.sum(dims), **TOL[dtype])
    torch.testing.assert_close(sum_dy_xc.double(), (dy64 * centered).sum(dims), **TOL[dtype])

    k, a, b = (random_input((x.shape[1],), dtype, seed=s) for s in (12, 13, 14))
    dx = ops.batch_norm_backward_elemt(dy, x, mean, k, a, b)
    truth = dy64 * k.double().view(per_channel) + centered * a.double().view(per_channel) + b.double().view(per_channel)
    torch.testing.assert_close(dx.double(), truth, **TOL[dtype])
    assert dx.stride() == x.stride()


def test_split_ops_check_their_arguments():
    ops, x = cpu_kernels.ops(), torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match="empty input"):
        ops.batch_norm_stats(x[:0])
    with pytest.raises(RuntimeError, match="dy must have x's shape"):
        ops.batch_norm_backward_reduce(torch.randn(4, 3, 4), x, torch.zeros(3))
    with pytest.raises(RuntimeError, match="mean must be a contiguous"):
        ops.batch_norm_backward_reduce(torch.randn(4, 3, 5), x, torch.zeros(4))
    with pytest.raises(RuntimeError, match="k must be a contiguous"):
        ops.batch_norm_backward_elemt(x, x, torch.zeros(3), torch.zeros(3, dtype=torch.float64), torch.zeros(3),
                                      torch.zeros(3))


@pytest.mark.parametrize("shape", [(100_000, 2), (40, 2, 50, 50)], ids=["rows", "planes"])
def test_float32_mean_1e4_variance_is_stable(shape):
    """The contract: float32 input, mean 1e4, std 1, variance within 1e-3 of float64."""
    g = torch.Generator().manual_seed(0)
    x64 = 1e4 + torch.randn(shape, generator=g, dtype=torch.float64)
    x = x64.float()
    dims = [0] + list(range(2, x.dim()))
    truth = x.double().var(dims, unbiased=False)
    with BF.cpu_backend("kernels"):
        _, mean, var = BF.batch_norm_train(x, None, None, 1e-5)
    assert torch.all((var.double() / truth - 1).abs() < 1e-3), (var, truth)
    assert torch.all((mean.double() - x.double().mean(dims)).abs() < 1e-2)


def test_output_is_centered_before_scaling():
    """With mean 1e4 and std 1, y = (x - mu) * scale keeps the digits that
    x * scale + shift would cancel: y matches float64 to float32 rounding of y."""
    g = torch.Generator().manual_seed(1)
    x = (1e4 + torch.randn(4096, 3, generator=g, dtype=torch.float64)).float()
    truth = F.batch_norm(x.double(), None, None, training=True)
    with BF.cpu_backend("kernels"):
        y = BF.batch_norm(x, None, None, training=True)
    assert (y.double() - truth).abs().max() < 1e-3


@pytest.mark.parametrize("shape", [(4096, 64), (16, 8, 32, 32), (64, 16, 8, 8)], ids=str)
def test_thread_counts_agree(shape):
    """1 and 2 threads split the work differently; results agree to float rounding."""
    x = random_input(shape, torch.float32, seed=2)
    dy = random_input(shape, torch.float32, seed=3, spread=False)
    w, b = random_affine(shape[1], torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with BF.cpu_backend("kernels"):
                results.append(run(BF.batch_norm, x, w, b, True, dy))
    finally:
        torch.set_num_threads(before)
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


def test_nan_channel_keeps_its_running_stats():
    x = random_input((8, 3, 2, 2), torch.float32, seed=5)
    x[2, 1, 0, 0] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    with BF.cpu_backend("kernels"):
        y = BF.batch_norm(x, rm, rv, training=True)
    assert torch.isnan(y[:, 1]).all() and not torch.isnan(y[:, [0, 2]]).any()
    assert rm[1] == 0 and rv[1] == 1 and rm[0] != 0 and rv[2] != 1


def test_half_inputs_and_empty_batches_use_the_tensor_ops():
    with BF.cpu_backend("kernels"):
        y = BF.batch_norm(torch.randn(8, 3).to(torch.bfloat16), None, None, training=True)
        assert y.dtype == torch.bfloat16
        empty = BF.batch_norm(torch.randn(0, 3, 2), torch.zeros(3), torch.ones(3), training=False)
        assert empty.shape == (0, 3, 2)


def test_running_update_is_an_inplace_change_autograd_sees():
    """The kernels bump the buffers' version counters, as torch's in-place ops
    do, so a graph that saved a buffer would notice the change. The eval-mode
    graph saves a copy of the running mean instead: built before a training
    step, it still backpropagates, through the statistics it used
    (test_nn_vs_torch checks those gradients)."""
    layer = bnn.BatchNorm1d(3)
    before = layer.running_mean._version
    layer(torch.randn(8, 3))
    assert layer.running_mean._version > before
    layer.eval()
    x = torch.randn(8, 3, requires_grad=True)
    y = layer(x)
    layer.train()
    layer(torch.randn(8, 3))
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


# --------------------------------------------------------------------------
# Training mode as one C++ autograd op: bnlib_cpu::batch_norm_train
# --------------------------------------------------------------------------

CPP_OP_LAYOUTS = ["(N,C)", "(N,C,L)", "NCHW", "NHWC", "NDHWC"]


def _train_step(apply, x, weight, bias, wanted, running, dy):
    """One training forward and backward through ``apply`` (the C++ op or
    the Python Function, same arguments): outputs, running estimates, and
    the gradients of the ``wanted`` inputs among x, weight, bias."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(name in wanted)
              for name, t in zip(("x", "weight", "bias"), (x, weight, bias))]
    rm, rv = (torch.linspace(-1, 1, x.shape[1], dtype=x.dtype), torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype))
    y, mu, var = apply(leaves[0], leaves[1], leaves[2], *((rm, rv) if running else (None, None)), 0.1, 1e-5)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None and t.requires_grad], dy)
    return [y, mu, var, rm, rv, *grads]


@pytest.mark.parametrize("running", [True, False], ids=["running", "no running"])
@pytest.mark.parametrize("wanted", [("x", "weight", "bias"), ("x",), ("weight", "bias"), ("bias",)], ids="+".join)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", CPP_OP_LAYOUTS)
def test_cpp_op_agrees_with_the_python_function_bit_for_bit(layout, dtype, affine, wanted, running):
    """The C++ autograd op computes what FusedCPUTrainFunction computes, with
    the same kernels: every output, running estimate and gradient is
    identical, for every subset of inputs that wants a gradient."""
    x = BF._dense(LAYOUTS[layout]().to(dtype))
    w, b = random_affine(x.shape[1], dtype)
    w, b = (w if "weight" in affine else None), (b if "bias" in affine else None)
    if not any((t is not None) for name, t in (("x", x), ("weight", w), ("bias", b)) if name in wanted):
        pytest.skip("no input that wants a gradient")
    dy = random_input(x.shape, dtype, seed=12, spread=False)
    assert BF._cpu_kernels(x) is not None  # (loads them for the Python Function too)
    cpp = _train_step(cpu_kernels.ops().batch_norm_train, x, w, b, wanted, running, dy)
    python = _train_step(BF.FusedCPUTrainFunction.apply, x, w, b, wanted, running, dy)
    assert len(cpp) == len(python)
    for ours, theirs in zip(cpp, python):
        assert ours.dtype == theirs.dtype and ours.stride() == theirs.stride()
        assert torch.equal(ours, theirs)


def _eval_step(apply, x, weight, bias, wanted, dy):
    """Eval mode through ``apply`` (the C++ op or the Python Function, same
    arguments): the output and the gradients of the ``wanted`` inputs."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(name in wanted)
              for name, t in zip(("x", "weight", "bias"), (x, weight, bias))]
    rm, rv = torch.linspace(-1, 1, x.shape[1], dtype=x.dtype), torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype)
    y = apply(leaves[0], leaves[1], leaves[2], rm, rv, 1e-5)
    return [y, *torch.autograd.grad(y, [t for t in leaves if t is not None and t.requires_grad], dy)]


@pytest.mark.parametrize("wanted", [("x", "weight", "bias"), ("x",), ("weight", "bias"), ("bias",)], ids="+".join)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", CPP_OP_LAYOUTS)
def test_cpp_eval_op_agrees_with_the_python_function_bit_for_bit(layout, dtype, affine, wanted):
    """Eval mode with grad: bnlib_cpu::batch_norm_eval_with_grad computes what
    BatchNormEvalFunction computes, output and gradients identical, the
    input's gradient in its layout."""
    x = BF._dense(LAYOUTS[layout]().to(dtype))
    w, b = random_affine(x.shape[1], dtype)
    w, b = (w if "weight" in affine else None), (b if "bias" in affine else None)
    if not any(t is not None for name, t in (("x", x), ("weight", w), ("bias", b)) if name in wanted):
        pytest.skip("no input that wants a gradient")
    dy = random_input(x.shape, dtype, seed=13, spread=False)
    assert BF._cpu_kernels(x) is not None
    cpp = _eval_step(cpu_kernels.ops().batch_norm_eval_with_grad, x, w, b, wanted, dy)
    python = _eval_step(BF.BatchNormEvalFunction.apply, x, w, b, wanted, dy)
    for ours, theirs in zip(cpp, python, strict=True):
        assert ours.dtype == theirs.dtype and ours.stride() == theirs.stride()
        assert torch.equal(ours, theirs)


def test_cpp_eval_op_second_derivatives_and_node():
    """Eval mode's backward is ATen ops, so create_graph=True differentiates
    it again: gradgradcheck in float64 for x, weight and bias; and the
    layer's eval-mode call records the C++ node."""
    x = random_input((5, 3, 2, 2), torch.float64, seed=5).requires_grad_()
    w, b = (t.requires_grad_() for t in random_affine(3, torch.float64))
    rm, rv = torch.linspace(-1, 1, 3, dtype=torch.float64), torch.linspace(0.5, 2, 3, dtype=torch.float64)
    with BF.cpu_backend("kernels"):
        fn = lambda *a: BF.batch_norm(a[0], rm, rv, a[1], a[2], False)  # noqa: E731
        assert fn(x, w, b).grad_fn.name() == "torch::autograd::CppNode<bnlib_cpu::BatchNormEval>"
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_eager_training_records_the_cpp_node():
    """Eager training with grad on records the C++ op's node (its name says
    which); with grad off there is no node at all."""
    x = random_input((6, 3), torch.float32, seed=1).requires_grad_()
    with BF.cpu_backend("kernels"):
        y = BF.batch_norm(x, None, None, None, None, True)
    assert y.grad_fn.name() == "torch::autograd::CppNode<bnlib_cpu::BatchNormTrain>"


def test_cpp_op_second_derivatives():
    """create_graph=True: the op's backward differentiates the formula
    (functional.batch_norm_formula written in ATen ops), so the gradient has
    a graph of its own; gradgradcheck in float64 for x, weight and bias, and
    a gradient penalty equal to torch's native op's."""
    x = random_input((5, 3, 2, 2), torch.float64, seed=3).requires_grad_()
    w, b = (t.requires_grad_() for t in random_affine(3, torch.float64))
    op = cpu_kernels.ops().batch_norm_train
    assert torch.autograd.gradgradcheck(lambda *a: op(*a, None, None, 0.1, 1e-5)[0], (x, w, b))
    penalties = []
    for bn in (lambda *a: op(*a, None, None, 0.1, 1e-5)[0], lambda *a: F.batch_norm(*a[:1], None, None, *a[1:], True)):
        (dx,) = torch.autograd.grad((bn(x, w, b) ** 3).sum(), [x], create_graph=True)
        penalties.append(torch.autograd.grad(dx.square().sum(), [x, w, b]))
    for ours, native in zip(*penalties):
        torch.testing.assert_close(ours, native, rtol=1e-9, atol=1e-9)


def test_cpp_op_refuses_a_backward_after_its_input_changed():
    """The op saves x for its backward; an in-place change of x after the
    forward makes the backward fail, as autograd fails for torch's ops,
    instead of computing with the new values."""
    x = random_input((6, 3), torch.float32, seed=2).requires_grad_()
    h = x * 1.0
    y, _, _ = cpu_kernels.ops().batch_norm_train(h, None, None, None, None, 0.1, 1e-5)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_cpp_op_in_inference_mode_runs_the_forward_alone():
    """Below autograd (inference mode) the op is the forward kernel: the same
    y and the same update of the running estimates, and no graph."""
    x = random_input((6, 3, 4), torch.float32, seed=4)
    results = []
    for inference in (False, True):
        rm, rv = torch.zeros(3), torch.ones(3)
        with torch.inference_mode(inference):
            y, _, _ = cpu_kernels.ops().batch_norm_train(x, None, None, rm, rv, 0.1, 1e-5)
        assert y.grad_fn is None
        results.append((y, rm, rv))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_torch_compile_traces_through_the_kernels():
    """The operators have shape-only ("fake") versions, so torch.compile can
    trace them in one graph, the running statistics' update included."""
    def step(x, w, b, rm, rv):
        return BF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = random_input((16, 4, 3), torch.float32, seed=3).requires_grad_()
    w, b = (t.requires_grad_() for t in random_affine(4, torch.float32))
    rm, rv = torch.zeros(4), torch.ones(4)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with BF.cpu_backend("kernels"):
        y = compiled(x, w, b, rm, rv)
    grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    y_ref = F.batch_norm(x, rm_ref, rv_ref, w, b, True, 0.1, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), torch.ones_like(y_ref))
    for a, r in zip([y, *grads, rm, rv], [y_ref, *grads_ref, rm_ref, rv_ref]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


COMPILE_FIRST = """
    import torch, bnlib.nn
    # A fresh process: the kernels are not loaded yet when torch.compile traces
    # the first call, and the input size changes on the second.
    layer = bnlib.nn.BatchNorm1d(3)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    ref = torch.nn.BatchNorm1d(3)
    for n in (8, 16):
        x = torch.randn(n, 3)
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    print("ok")
"""


@pytest.mark.skipif(tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 11),
                    reason="torch.compile of the tensor-op path: tested from torch 2.11 (2.4's dynamo cannot "
                           "trace its backward)")
def test_torch_compile_before_any_eager_call():
    """fullgraph compilation in a fresh process, two batch sizes: no file access and no
    string formatting of sizes in the traced code."""
    done = _python(COMPILE_FIRST, OMP_NUM_THREADS="1")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="cpu backend should be one of"):
        BF.set_cpu_backend("fast")
    assert BF.get_cpu_backend() in BF.CPU_BACKENDS


def test_the_library_is_cached_by_content():
    path = cpu_kernels.library_path()
    assert path.exists() and path.suffix == ".so"
    assert cpu_kernels.build() == path  # cached: no second compile


def _python(code, **env):
    environment = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, cwd=REPO, timeout=300)


FALLBACK_CHECK = """
    import warnings, torch, bnlib.functional as BF
    from bnlib import cpu_kernels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(16, 3, requires_grad=True)
        y = BF.batch_norm(x, None, None, training=True)
        y.sum().backward()
    print(cpu_kernels.is_available(), [str(w.message)[:60] for w in caught])
    assert torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
"""


def test_turned_off_by_environment(tmp_path):
    done = _python(FALLBACK_CHECK, BNLIB_CPU_KERNELS="0", BNLIB_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False []")  # off, silently
    assert not list(tmp_path.iterdir())  # nothing built


def test_falls_back_with_one_warning_without_a_compiler(tmp_path):
    done = _python(FALLBACK_CHECK, CXX=str(tmp_path / "no-such-compiler"), BNLIB_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False [")
    assert done.stdout.count("fused CPU kernels are not available (C++ compiler") == 1, done.stdout


def test_a_broken_cached_library_is_rebuilt(tmp_path):
    """A cached file that does not load (truncated by a crash) is deleted and
    built again. The "compiler" copies the library already built (compiling
    takes half a minute; the real command is tested by every other test)."""
    code = """
        import os, torch, bnlib.cpu_kernels as k
        calls = []
        def copy_built(source, output, cxx):
            if str(output).endswith(".tmp"):  # a build, not library_path's key
                calls.append(output)
            return ["cp", os.environ["BUILT_LIBRARY"], str(output)]
        k.compile_command = copy_built
        path = k.library_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a shared library")
        print(k.load(), path.stat().st_size > 1000, len(calls))
    """
    built = cpu_kernels.build()
    done = _python(code, BNLIB_CACHE_DIR=str(tmp_path), BUILT_LIBRARY=str(built))
    assert done.returncode == 0, done.stderr
    # loaded; the broken file replaced; by one build
    assert done.stdout.split() == ["True", "True", "1"], (done.stdout, done.stderr)


def test_the_compile_command_is_portable():
    """No -march=native (stored outputs must not depend on the CPU's vector
    width beyond AVX2), and no silent fused multiply-adds."""
    cmd = cpu_kernels.compile_command("a.cpp", "a.so", "c++")
    assert "-march=native" not in cmd and "-ffp-contract=off" in cmd


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_grad_calls_skip_the_function_and_agree(training):
    """Under torch.no_grad() the kernels are called without an autograd
    Function (nothing to record): same output, same running statistics."""
    x = random_input((8, 3, 4, 4), torch.float32, seed=11)
    w, b = random_affine(3, torch.float32)
    results = []
    for grad in (True, False):
        rm, rv = torch.linspace(-1, 1, 3), torch.linspace(0.5, 2, 3)
        with torch.set_grad_enabled(grad), BF.cpu_backend("kernels"):
            y = BF.batch_norm(x, rm, rv, w.requires_grad_(grad), b, training, 0.1, 1e-5)
        assert (y.grad_fn is None) == (not grad)
        results.append([y.detach(), rm, rv])
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


# --------------------------------------------------------------------------
# Layer, group and instance norm: grouped_norm_forward / grouped_norm_backward
# --------------------------------------------------------------------------

import bnlib.alternatives as alt  # noqa: E402

# (name, the functional call, input shape): every way the loops index the
# parameters (per channel over runs of S values; per position in the row),
# rows longer than one summing block (8192 float32 values), runs longer than
# one block, one-value runs, and a normalized shape with a 1 inside.
GROUPED_CASES = {
    "group norm NCHW": (lambda x, w, b: alt.group_norm(x, 4, w, b), (5, 8, 3, 7), 8),
    "group norm (N,C)": (lambda x, w, b: alt.group_norm(x, 2, w, b), (9, 6), 6),
    "group norm G=1, 3d": (lambda x, w, b: alt.group_norm(x, 1, w, b), (2, 3, 4, 3, 5), 3),
    "group norm G=C": (lambda x, w, b: alt.group_norm(x, 6, w, b), (3, 6, 11), 6),
    "group norm, runs over a block": (lambda x, w, b: alt.group_norm(x, 2, w, b), (2, 4, 96, 96), 4),
    "instance norm 1d": (lambda x, w, b: alt.instance_norm(x, weight=w, bias=b), (4, 3, 10), 3),
    "instance norm 3d": (lambda x, w, b: alt.instance_norm(x, weight=w, bias=b), (2, 3, 2, 3, 4), 3),
    "layer norm, last dim": (lambda x, w, b: alt.layer_norm(x, (13,), w, b), (3, 5, 13), (13,)),
    "layer norm, three dims": (lambda x, w, b: alt.layer_norm(x, (4, 1, 5), w, b), (3, 4, 1, 5), (4, 1, 5)),
    "layer norm, rows over a block": (lambda x, w, b: alt.layer_norm(x, (3, 4000), w, b), (2, 3, 4000), (3, 4000)),
    # RMS norm: the same loops without the mean (its bias argument unused)
    "RMS norm, last dim": (lambda x, w, b: alt.rms_norm(x, (13,), w), (3, 5, 13), (13,)),
    "RMS norm, two dims, over a block": (lambda x, w, b: alt.rms_norm(x, (3, 4000), w), (2, 3, 4000), (3, 4000)),
    # filter response norm: RMS norm of each (sample, channel) map, then an affine map and a threshold
    "filter response norm": (lambda x, w, b: alt.filter_response_norm(x, w, b, None if b is None else -b),
                             (4, 6, 5, 7), 6),
}


def grouped_run(fn, x, weight, bias, dy):
    x = x.detach().clone().requires_grad_()
    params = [None if p is None else p.detach().clone().requires_grad_() for p in (weight, bias)]
    y = fn(x, *params)
    y.backward(dy)
    return [y, x.grad] + [p.grad for p in params if p is not None and p.grad is not None]


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(GROUPED_CASES))
def test_grouped_norm_kernels_match_the_tensor_ops(case, dtype, affine):
    fn, shape, param_shape = GROUPED_CASES[case]
    param_shape = (param_shape,) if isinstance(param_shape, int) else param_shape
    x = (random_input(shape, torch.float64, seed=21) * 2 + 3).to(dtype)
    g = torch.Generator().manual_seed(22)
    weight = (torch.rand(param_shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(param_shape, generator=g, dtype=torch.float64).to(dtype)
    weight, bias = {"both": (weight, bias), "weight": (weight, None), "none": (None, None)}[affine]
    dy = random_input(shape, torch.float64, seed=23).to(dtype)
    kernels_agree_with_tensor_ops(fn, x, weight, bias, dy)


def kernels_agree_with_tensor_ops(fn, x, weight, bias, dy):
    """The C++ loops' output and gradients against the tensor-op path's, to
    the dtype's tolerance; returns both."""
    with BF.cpu_backend("kernels"):
        ours = grouped_run(fn, x, weight, bias, dy)
    with BF.cpu_backend("tensor_ops"):
        theirs = grouped_run(fn, x, weight, bias, dy)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL[x.dtype])
    return ours, theirs


@pytest.mark.parametrize("name,module,shape", [
    ("GroupNorm", lambda: bnn.GroupNorm(2, 4), (3, 4, 5, 5)),
    ("LayerNorm", lambda: bnn.LayerNorm(6), (4, 6)),
    ("InstanceNorm2d", lambda: bnn.InstanceNorm2d(4, affine=True), (3, 4, 5, 5)),
    ("RMSNorm", lambda: bnn.RMSNorm(6), (4, 6)),
])
def test_grouped_norm_runs_one_op_per_direction(name, module, shape):
    """GroupNorm, LayerNorm and the instance norms call the C++ loops: one
    custom op forward, one backward, and no pass of tensor ops over x."""
    from bnlib import perf

    layer = module()
    x = random_input(shape, torch.float32, seed=24).requires_grad_()
    with BF.cpu_backend("kernels"):
        y, fwd_ops = perf.op_traffic(layer, x)
        _, bwd_ops = perf.op_traffic(y.backward, torch.randn(y.shape))
    fwd = [op for op, *_ in perf.traffic_table(fwd_ops, x.numel() * 4)]
    bwd = [op for op, *_ in perf.traffic_table(bwd_ops, x.numel() * 4)]
    assert fwd[0] == "grouped_norm_forward.default" and fwd[-1] == "total", fwd
    assert "grouped_norm_backward.default" in bwd, bwd
    assert not [op for op in fwd + bwd if op.startswith(("sub", "mul", "mean", "sum"))], (fwd, bwd)


def test_grouped_norm_gradcheck_through_the_kernels():
    x = random_input((3, 4, 2, 3), torch.float64, seed=25).requires_grad_()
    w, b = (t.requires_grad_() for t in random_affine(4, torch.float64))
    with BF.cpu_backend("kernels"):
        assert torch.autograd.gradcheck(lambda *a: alt.group_norm(a[0], 2, a[1], a[2]), (x, w, b))
        xl = random_input((4, 5), torch.float64, seed=26).requires_grad_()
        wl, bl = (t.requires_grad_() for t in random_affine(5, torch.float64, seed=27))
        assert torch.autograd.gradcheck(lambda *a: alt.layer_norm(a[0], (5,), a[1], a[2]), (xl, wl, bl))


# The C++ autograd op grouped_norm_train: layer, group, instance and RMS norm
# on contiguous rows in eager mode (filter response norm and channels-last
# inputs keep the Python Functions).
OP_CASES = [case for case in GROUPED_CASES if not case.startswith("filter")]


@pytest.mark.parametrize("wanted", [("x", "weight", "bias"), ("x",), ("weight", "bias"), ("weight",)], ids="+".join)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", OP_CASES)
def test_grouped_op_agrees_with_the_python_functions_bit_for_bit(case, dtype, affine, wanted, monkeypatch):
    """What the op computes is what GroupedNormFunction and RMSNormFunction
    compute on the same loops: outputs and every wanted gradient identical
    (the Functions run when alternatives._grouped_train_op declines)."""
    fn, shape, param_shape = GROUPED_CASES[case]
    if case.startswith("RMS") and affine == "both":
        pytest.skip("RMS norm has no bias")
    param_shape = (param_shape,) if isinstance(param_shape, int) else param_shape
    x = (random_input(shape, torch.float64, seed=21) * 2 + 3).to(dtype)
    g = torch.Generator().manual_seed(22)
    w = torch.rand(param_shape, generator=g, dtype=torch.float64).add(0.5).to(dtype) if affine != "none" else None
    b = torch.randn(param_shape, generator=g, dtype=torch.float64).to(dtype) if affine == "both" else None
    dy = random_input(shape, dtype, seed=23, spread=False)
    leaves_of = dict(x=x, weight=w, bias=b)
    if not any(leaves_of[name] is not None for name in wanted):
        pytest.skip("no input that wants a gradient")
    results = []
    for op in (True, False):
        if not op:
            monkeypatch.setattr(alt, "_grouped_train_op", lambda *args, **kwargs: None)
        leaves = {name: None if t is None else t.detach().clone().requires_grad_(name in wanted)
                  for name, t in leaves_of.items()}
        with BF.cpu_backend("kernels"):
            y = fn(leaves["x"], leaves["weight"], leaves["bias"])
        node = y.grad_fn.name()
        assert ("GroupedNormTrain" in node) == op, node
        results.append([y, *torch.autograd.grad(y, [t for t in leaves.values() if t is not None and t.requires_grad], dy)])
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@pytest.mark.parametrize("centered", [True, False], ids=["centered", "RMS"])
def test_grouped_op_second_derivatives(centered):
    """create_graph=True through the op differentiates its formula in ATen
    ops: gradgradcheck in float64 for x, weight and bias (group norm's
    per-channel parameters, RMS norm's per-element weight)."""
    x = random_input((3, 4, 2, 3), torch.float64, seed=29).requires_grad_()
    w, b = (t.requires_grad_() for t in random_affine(4, torch.float64))
    with BF.cpu_backend("kernels"):
        if centered:
            fn, inputs = (lambda *a: alt.group_norm(a[0], 2, a[1], a[2])), (x, w, b)
        else:
            w6 = random_affine(6, torch.float64)[0].requires_grad_()
            fn, inputs = (lambda *a: alt.rms_norm(a[0], (2, 3), a[1].view(2, 3), 1e-6)), (x, w6)
        assert "GroupedNormTrain" in fn(*inputs).grad_fn.name()
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_grouped_op_without_grad_and_in_inference_mode():
    """Without grad the op records nothing; in inference mode (below
    autograd) it is the forward kernel alone: the same outputs either way."""
    x = random_input((4, 6, 5), torch.float32, seed=32)
    for layer in (bnn.LayerNorm(5), bnn.GroupNorm(2, 6), bnn.RMSNorm(5)):
        with torch.no_grad():
            without_grad = layer(x)
        with torch.inference_mode():
            inference = layer(x)
        assert without_grad.grad_fn is None and inference.is_inference()
        assert torch.equal(without_grad, inference)
        assert torch.equal(without_grad, layer(x).detach())


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "RMSNorm"])
def test_grouped_op_batched_gradients_match_torch(name):
    """autograd.grad(..., is_grads_batched=True): a batched dy holds no data
    for the loops, and the op's backward takes its formulas in ATen ops."""
    make = {"LayerNorm": lambda m: m.LayerNorm(6), "GroupNorm": lambda m: m.GroupNorm(2, 4),
            "RMSNorm": lambda m: m.RMSNorm(6, eps=1e-6)}[name]
    shape = (3, 4, 5) if name == "GroupNorm" else (5, 6)
    results = []
    for module in (torch.nn, bnn):
        layer = make(module)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 2, layer.weight.numel()))
        x = random_input(shape, torch.float32, seed=30).requires_grad_()
        with BF.cpu_backend("kernels"):
            y = layer(x)
            v = torch.randn((4,) + y.shape, generator=torch.Generator().manual_seed(31))
            results.append(torch.autograd.grad(y, [x, layer.weight], v, is_grads_batched=True))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "contiguous, means +-1e4", "channels_last",
                                    "channels_last, means +-1e4"])
def test_grouped_norm_statistics_are_stable_at_a_large_mean(layout):
    """float32 rows with mean 1e4 and spread 1 (and groups whose channels sit
    at +1e4 and -1e4: a contiguous row's head, the first channel, is then far
    from the row's mean, and its statistics take their second pass): the
    kernels' shifted sums give unit variance (E[x^2] - E[x]^2 would give
    garbage), and float64's output to float32 rounding."""
    g = torch.Generator().manual_seed(28)
    if layout.startswith("contiguous"):
        x = 1e4 + torch.randn(4, 8, 300, generator=g)
    else:
        x = 1e4 + torch.randn(4, 8, 20, 15, generator=g)
    if layout.endswith("1e4"):
        x[:, 1::2] *= -1
    if layout.startswith("channels_last"):
        x = x.to(memory_format=torch.channels_last)
    with BF.cpu_backend("kernels"):
        y = alt.group_norm(x, 2, None, None)
    var = y.double().reshape(4, 2, -1).var(-1, unbiased=False)
    torch.testing.assert_close(var, torch.ones_like(var), rtol=1e-4, atol=1e-4)
    want = torch.nn.functional.group_norm(x.double(), 2)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("input_grad", [True, False], ids=["with dx", "dw, db alone"])
def test_layer_norm_parameter_gradients_over_many_rows(threads, input_grad):
    """Layer norm's per-element dw, db are summed in float32 over 16 rows at a
    time, then in float64 (summing every row in float64 took 60% of the
    backward). 37 rows: two full stages and a partial one; against float64."""
    x = random_input((37, 64), torch.float32, seed=40, spread=False)
    w, b = random_affine(64, torch.float32, seed=41)
    dy = random_input((37, 64), torch.float32, seed=42, spread=False)
    want = grouped_run(lambda *a: torch.nn.functional.layer_norm(a[0], (64,), a[1], a[2]),
                       x.double(), w.double(), b.double(), dy.double())
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with BF.cpu_backend("kernels"):
            if input_grad:
                got = grouped_run(lambda *a: alt.layer_norm(a[0], (64,), a[1], a[2]), x, w, b, dy)
            else:  # x needs no gradient: only dw, db are computed
                wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
                alt.layer_norm(x, (64,), wg, bg).backward(dy)
                got, want = [wg.grad, bg.grad], want[2:]
    finally:
        torch.set_num_threads(previous)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g.double(), w_, rtol=1e-5, atol=1e-5)


def test_grouped_norm_row_whose_head_is_unlike_the_rest():
    """A row's statistics are taken in one pass, shifted by the mean of the
    row's first values. Where those sit 30 standard deviations from the rest,
    the shift is off by 7.5 of the row's own, and the one pass alone would
    leave errors near 1e-4 in y: the kernel sees it and takes a second pass,
    shifted by the mean it found, and y stays within float32's rounding of
    float64's (torch's own kernel: 1.6e-6 here)."""
    g = torch.Generator().manual_seed(29)
    x = torch.randn(64, 1024, generator=g)
    x[:, :16] += 30.0
    with BF.cpu_backend("kernels"):
        y = alt.layer_norm(x, (1024,))
    want = torch.nn.functional.layer_norm(x.double(), (1024,))
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5)


def test_channels_last_statistics_of_nearly_constant_channels():
    """Channels of two float32 values near 3e6, a quarter apart: the shift
    (the mean of a channel's first positions) was a float32 running sum of
    4096 values near 3e6, which rounds by units; it landed hundreds of
    standard deviations off, the one pass gave a negative variance, and
    every output was NaN. Now summed as differences from the first value,
    with a second pass for a channel still over a standard deviation off,
    the variance is float64's to 1e-6, as on the contiguous loops."""
    g = torch.Generator().manual_seed(0)
    x = 3.0e6 + 0.25 * (torch.rand(1, 2, 64, 64, generator=g) < 0.5).float()
    want = x.double().reshape(1, 2, -1).var(-1, unbiased=False).flatten()
    ops = BF._cpu["ops"]
    variances = {
        "channels last": ops.grouped_norm_forward_cl(x.contiguous(memory_format=torch.channels_last),
                                                     torch.ones(2), None, 2, 1e-5, True)[2],
        "contiguous": ops.grouped_norm_forward(x, torch.ones(2), None, 2, 4096, 2, 1e-5, True)[2],
    }
    for layout, var in variances.items():
        torch.testing.assert_close(var.double(), want, rtol=1e-6, atol=0, msg=layout)
    with BF.cpu_backend("kernels"):
        assert torch.isfinite(alt.group_norm(x.contiguous(memory_format=torch.channels_last), 2)).all()


def test_channels_last_channel_whose_head_is_unlike_the_rest():
    """Each channel's first 256 positions, which set its shift, sit 64 units
    above the rest (standard deviation 1): the shift is about 4 of the
    channel's standard deviations from its mean, and the one pass alone left
    errors of 5e-6 in y, ten times torch's. Those channels' sums are taken
    again, and y is within float32 rounding of float64's, as torch's and the
    contiguous loops' (5e-7)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g)
    x[:, :, :4] += 64.0
    want = torch.nn.functional.group_norm(x.double(), 2)
    with BF.cpu_backend("kernels"):
        y = alt.group_norm(x.contiguous(memory_format=torch.channels_last), 2)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1.5e-6)


# (the functional call, input shape, parameters): channels-last inputs the
# loops grouped_norm_*_cl read in place: groups of several channels, one
# channel, all channels, 5-D, more positions than one summing block (2048
# of 4 float32 channels), more channels than one block, and filter response
# norm (RMS norm of each channel, its one-for-all weight of ones).
CHANNELS_LAST_CASES = {
    "group norm NHWC": (lambda x, w, b: alt.group_norm(x, 4, w, b), (5, 8, 3, 7), 8),
    "group norm G=1 NDHWC": (lambda x, w, b: alt.group_norm(x, 1, w, b), (2, 3, 4, 3, 5), 3),
    "group norm G=C": (lambda x, w, b: alt.group_norm(x, 6, w, b), (3, 6, 1, 11), 6),
    "group norm, positions over a block": (lambda x, w, b: alt.group_norm(x, 2, w, b), (2, 4, 64, 48), 4),
    "group norm, channels over a block": (lambda x, w, b: alt.group_norm(x, 5, w, b), (2, 4100, 1, 3), 4100),
    "instance norm 2d": (lambda x, w, b: alt.instance_norm(x, weight=w, bias=b), (4, 3, 5, 2), 3),
    "filter response norm": (lambda x, w, b: alt.filter_response_norm(x, w, b, None if b is None else -b),
                             (4, 6, 5, 7), 6),
}


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(CHANNELS_LAST_CASES))
def test_grouped_norm_channels_last_loops_match_the_tensor_ops(case, dtype, affine):
    """Channels-last input, read in place (no copy to (N, C, ...) order):
    the tensor-op path's output, input and parameter gradients, and the
    output and input gradient in torch's layout."""
    from bnlib import perf

    fn, shape, params = CHANNELS_LAST_CASES[case]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = (random_input(shape, torch.float64, seed=34) * 2 + 3).to(dtype).contiguous(memory_format=fmt)
    g = torch.Generator().manual_seed(35)
    weight = (torch.rand(params, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(params, generator=g, dtype=torch.float64).to(dtype)
    weight, bias = {"both": (weight, bias), "weight": (weight, None), "none": (None, None)}[affine]
    dy = random_input(shape, torch.float64, seed=36).to(dtype).contiguous(memory_format=fmt)
    with BF.cpu_backend("kernels"):
        y, ops = perf.op_traffic(fn, x, weight, bias)
        names = [op["op"] for op in ops]
        # no copy of the input; instance norm's output is copied to torch's contiguous layout
        big_copies = [op for op in ops if op["op"] == "clone.default" and op["written"] >= x.nbytes]
        assert "grouped_norm_forward_cl.default" in names, names
        assert len(big_copies) == (0 if y.is_contiguous(memory_format=fmt) else 1), ops
    ours, theirs = kernels_agree_with_tensor_ops(fn, x, weight, bias, dy)
    assert ours[0].stride() == theirs[0].stride() and ours[1].stride() == theirs[1].stride()


def test_grouped_norm_channels_last_loops_check_their_arguments():
    ops = BF._cpu["ops"] if BF._cpu_kernels(torch.ones(1)) is not None else pytest.skip("no C++ loops here")
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    w = torch.ones(4)
    with pytest.raises(RuntimeError, match="channels-last input"):
        ops.grouped_norm_forward_cl(x.contiguous(), w, None, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="3 groups do not divide 4 channels"):
        ops.grouped_norm_forward_cl(x, w, None, 3, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous \(C,\) tensor"):
        ops.grouped_norm_forward_cl(x, torch.ones(3), None, 2, 1e-5, True)
    y, mean, var, invstd = ops.grouped_norm_forward_cl(x, w, None, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="dy must be channels last"):
        ops.grouped_norm_backward_cl(y.contiguous(), x, mean, invstd, w, True, True, True)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_grouped_norm_strided_inputs_reach_the_loops(layout):
    """A channels-last float64 input goes to the channels-last loops, any
    other strided one through a contiguous copy: the tensor-op path's
    results, the output in torch's layout, and second derivatives that still
    reach the input."""
    from bnlib import perf

    x = random_input((2, 4, 3, 5), torch.float64, seed=29)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.transpose(2, 3)
    w, b = random_affine(4, torch.float64)
    dy = random_input(x.shape, torch.float64, seed=33)
    fn = lambda *a: alt.group_norm(a[0], 2, a[1], a[2])  # noqa: E731
    op = {"channels_last": "grouped_norm_forward_cl.default", "transposed": "grouped_norm_forward.default"}[layout]
    with BF.cpu_backend("kernels"):
        _, ops = perf.op_traffic(fn, x, w, b)
        assert op in [op["op"] for op in ops]
        ours = grouped_run(fn, x, w, b, dy)
        xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (xg, wg, bg))
    with BF.cpu_backend("tensor_ops"):
        theirs = grouped_run(fn, x, w, b, dy)
    for a, b_ in zip(ours, theirs):
        torch.testing.assert_close(a, b_, **TOL[torch.float64])
    expected = torch.nn.functional.group_norm(x, 2, w, b)
    assert ours[0].stride() == expected.stride()


def test_grouped_norm_half_inputs_take_the_tensor_ops():
    """float16 and bfloat16 inputs keep the tensor ops (float32 inside)."""
    from bnlib import perf

    x = random_input((2, 4, 3, 3), torch.float32, seed=29)
    with BF.cpu_backend("kernels"):
        for t in (x.to(torch.bfloat16), x.to(torch.float16)):
            y, ops = perf.op_traffic(alt.group_norm, t, 2)
            assert "grouped_norm_forward.default" not in [op["op"] for op in ops]
            expected = alt.group_norm(t.float(), 2).to(t.dtype)
            torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fn,shape,params,memory_format", [
    (lambda *a: alt.group_norm(a[0], 4, a[1], a[2]), (6, 8, 5, 5), 8, torch.contiguous_format),
    # few long rows: fewer tasks than threads, so that the buffers stay small
    (lambda *a: alt.layer_norm(a[0], (300,), a[1], a[2]), (24, 300), 300, torch.contiguous_format),
    # the channels-last loops split the samples instead
    (lambda *a: alt.group_norm(a[0], 4, a[1], a[2]), (6, 8, 5, 5), 8, torch.channels_last),
], ids=["group norm", "layer norm, few rows", "group norm NHWC"])
def test_grouped_norm_threads_agree(fn, shape, params, memory_format):
    """Rows (channels last: samples) are split among threads, and each
    thread's parameter gradients summed in its own buffer: 1 and 3 threads
    agree to float rounding."""
    x = random_input(shape, torch.float32, seed=30).contiguous(memory_format=memory_format).requires_grad_()
    w, b = (t.requires_grad_() for t in random_affine(params, torch.float32))
    dy = random_input(shape, torch.float32, seed=31).contiguous(memory_format=memory_format)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            with BF.cpu_backend("kernels"):
                results.append(grouped_run(fn, x, w, b, dy))
    finally:
        torch.set_num_threads(previous)
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,module,shape", [
    ("GroupNorm", lambda: bnn.GroupNorm(4, 8), (3, 8, 5, 5)),
    ("GroupNorm NHWC", lambda: bnn.GroupNorm(4, 8), (3, 8, 5, 5)),
    ("LayerNorm", lambda: bnn.LayerNorm(12), (4, 12)),
])
def test_grouped_norm_under_torch_compile(name, module, shape):
    """fullgraph compilation through the loops (their shapes-only versions,
    cpu_kernels._register_fakes): the eager output and input gradient."""
    layer = module()
    x = random_input(shape, torch.float32, seed=32)
    if name.endswith("NHWC"):
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    with BF.cpu_backend("kernels"):
        expected = layer(x)
        expected.sum().backward()
        expected_grad, x.grad = x.grad, None
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        y.sum().backward()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, expected_grad)


@pytest.mark.parametrize("name,fn,shape", [
    ("layer norm", lambda x: alt.layer_norm(x, (6,)), (4, 5, 6)),
    ("group norm", lambda x: alt.group_norm(x, 2), (4, 6, 3, 3)),
    ("group norm NHWC", lambda x: alt.group_norm(x.contiguous(memory_format=torch.channels_last), 2), (4, 6, 3, 3)),
    ("instance norm", lambda x: alt.instance_norm(x), (4, 6, 7)),
])
def test_grouped_norm_without_grad_skips_the_function(name, fn, shape, monkeypatch):
    """Under no_grad the loops run without the autograd Function (its
    overhead was a quarter of a small call's 24 us), with the same output."""
    x = random_input(shape, torch.float32, seed=43)
    with BF.cpu_backend("kernels"):
        want = fn(x.clone().requires_grad_())

        def no_function(*args):
            raise AssertionError("GroupedNormFunction.apply under no_grad")

        monkeypatch.setattr(alt.GroupedNormFunction, "apply", no_function)
        with torch.no_grad():
            got = fn(x)
    assert want.grad_fn is not None and got.grad_fn is None
    assert torch.equal(got, want.detach()) and got.stride() == want.stride()
