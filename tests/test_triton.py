"""bnlib.triton_kernels against torch.nn.functional.batch_norm.

The kernels run two ways here:

- Triton's interpreter, on CPU tensors, on any machine with Triton. It is
  chosen when ``bnlib.triton_kernels`` is imported with ``TRITON_INTERPRET=1``
  in the environment, which pytest's own process does not have (and another
  test file may have imported the module already), so
  ``test_interpreter_suite`` runs this file again in a subprocess with the
  variable set; there the tests marked ``interp`` run, here they are skipped.
  To see them one by one: ``TRITON_INTERPRET=1 pytest tests/test_triton.py``.
- Compiled, on CUDA tensors (marked ``cuda``): skipped without a GPU.

The truth is torch's batch norm in float64 on the CPU, and on CUDA also
torch's native CUDA batch norm. Errors are measured as ``|got - want| / |want|``
in the 2-norm over the whole tensor; the tolerances say what rounding allows:

- float64: 1e-12, a few ulps accumulated over sums of at most a few thousand
  terms; running stats 1e-7 (on CUDA ``momentum`` reaches the kernel as a
  float32, relative error 1.5e-8).
- float32: 1e-5 (sums of <= 1e6 terms, relative rounding 6e-8 per step).
- float16: 3e-3 (the output is rounded to 11 bits: relative 4.9e-4 per element,
  dx amplifies it a few times).
- bfloat16: 2e-2 (8 bits: relative 3.9e-3 per element).
"""

import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from bnlib import triton_kernels as tk  # noqa: E402  (after the importorskip)

INTERPRET = tk._INTERPRET
CUDA = torch.cuda.is_available() and not INTERPRET

interp = pytest.mark.skipif(not INTERPRET, reason="runs in test_interpreter_suite's subprocess (TRITON_INTERPRET=1)")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
RUNNING_TOL = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}

# Launch configurations that reach every code path on small inputs:
# one split (the one-launch kernels) and several splits with tiny tiles (loops
# over many tiles, masked tails, several channel blocks), the splits merged
# either by the elementwise kernels themselves (two launches per pass) or by a
# finalize kernel (three), with and without prefetching.
ONE_SPLIT = {"n_split": 1, "prefetch": False}
SPLITS = {"n_split": 3, "tile": 8, "block_c": 2, "max_block_s": 4, "prefetch": True}
SPLITS_FINALIZE = {**SPLITS, "fuse_finalize_max_splits": 0}
CONFIGS = [ONE_SPLIT, SPLITS, SPLITS_FINALIZE]
CONFIG_IDS = ["one_split", "splits", "splits_finalize"]


def rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def make_input(shape, dtype, device, layout="contiguous", mean=2.0, std=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    x = x.to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


# run_both's results on CPU tensors, by arguments: under the interpreter every
# kernel launch costs seconds, and some tests compare runs that others check.
_RUN_BOTH_CPU = {}


def run_both(shape, dtype, device, layout="contiguous", training=True, affine=True, running=True,
             momentum=0.1, eps=1e-5, config=None, seed=0):
    """Forward and backward through bnlib's kernels (in ``dtype``) and torch (float64, CPU).

    Returns dict name -> (got, want) for y, dx, dgamma, dbeta, running_mean, running_var.
    The tensors are shared between calls with the same arguments on the CPU: read them only.
    """
    args = (shape, dtype, device, layout, training, affine, running, momentum, eps,
            None if config is None else tuple(sorted(config.items())), seed)
    if device != "cpu":
        return _run_both(*args[:-2], config=config, seed=seed)
    if args not in _RUN_BOTH_CPU:
        _RUN_BOTH_CPU[args] = _run_both(*args[:-2], config=config, seed=seed)
    return _RUN_BOTH_CPU[args]


def _run_both(shape, dtype, device, layout, training, affine, running, momentum, eps, config, seed):
    C = shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    x = make_input(shape, dtype, device, layout, seed=seed)
    dy = make_input(shape, dtype, device, layout, mean=0.0, std=1.0, seed=seed + 2)
    w = torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    rm = torch.randn(C, generator=g, dtype=torch.float64) if running else None
    rv = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if running else None

    def params(dev, dt):
        out = [None if t is None else t.to(dev, dt, copy=True).requires_grad_() for t in (w, b)]
        out += [None if t is None else t.to(dev, dt, copy=True) for t in (rm, rv)]
        return out

    # bnlib: parameters and running stats in float32 for half inputs (mixed precision, as in torch.nn)
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w1, b1, rm1, rv1 = params(device, pdt)
    x1 = x.clone().requires_grad_()
    y1 = tk.batch_norm(x1, rm1, rv1, w1, b1, training, momentum, eps, config=config)
    inputs1 = [t for t in (x1, w1, b1) if t is not None]
    grads1 = torch.autograd.grad(y1, inputs1, dy)

    w2, b2, rm2, rv2 = params("cpu", torch.float64)
    x2 = x.detach().cpu().double().requires_grad_()
    y2 = F.batch_norm(x2, rm2, rv2, w2, b2, training, momentum, eps)
    inputs2 = [t for t in (x2, w2, b2) if t is not None]
    grads2 = torch.autograd.grad(y2, inputs2, dy.cpu().double())

    assert y1.dtype == dtype and y1.shape == x.shape and y1.device == x.device
    assert y1.stride() == x.stride(), "the output keeps the input's memory layout"
    assert grads1[0].dtype == dtype
    out = {"y": (y1, y2), "dx": (grads1[0], grads2[0])}
    if affine:
        out["dgamma"] = (grads1[1], grads2[1])
        out["dbeta"] = (grads1[2], grads2[2])
    if running:
        out["running_mean"] = (rm1, rm2)
        out["running_var"] = (rv1, rv2)
    return out


def check(results, dtype):
    for name, (got, want) in results.items():
        tol = RUNNING_TOL[dtype] if name.startswith("running") else TOL[dtype]
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


SHAPES = [
    ((7, 5), "contiguous"),
    ((4, 3, 10), "contiguous"),
    ((3, 4, 5, 6), "contiguous"),
    ((3, 4, 5, 6), "channels_last"),
    ((2, 3, 2, 3, 4), "contiguous"),
    ((2, 3, 2, 3, 4), "channels_last"),
]


# ---------------------------------------------------------------------------
# The interpreter suite (CPU): runs this file in a subprocess with TRITON_INTERPRET=1
# ---------------------------------------------------------------------------


# A loop bound computed in a kernel, the pattern every bnlib kernel has. Some
# Triton interpreters turn it into a Python int with ``int(array)``, which
# NumPy 2.4 refuses for a 1-element array ("only 0-dimensional arrays can be
# converted to Python scalars"): triton-lang/triton#9171, fixed by #9172. Seen
# here with Triton 3.6 and NumPy 2.4; Triton 3.9, or NumPy 2.2, works.
_LOOP_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def count(out_ptr, n):
    total = 0
    for _ in range(0, tl.minimum(n, 4)):
        total += 1
    tl.store(out_ptr, total)
out = torch.zeros(1, dtype=torch.int32)
count[(1,)](out, 3)
assert out.item() == 3
"""


def _interpreter_runs_loops(env):
    """None if Triton's interpreter runs a computed loop bound here, else the error it gave."""
    proc = subprocess.run([sys.executable, "-c", _LOOP_PROBE], env=env, capture_output=True, text=True, timeout=120)
    return None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]


def test_kernels_launch_on_the_input_device():
    """Triton launches on the current CUDA device: the entry point makes the
    input's device current when it is another one, and does nothing on the CPU
    (the interpreter) or on the current device. (Two GPUs: tests/test_cuda.py.)"""
    import contextlib

    assert isinstance(tk._on_device(torch.device("cpu")), contextlib.nullcontext)
    if torch.cuda.is_available():
        here = torch.device("cuda", torch.cuda.current_device())
        assert isinstance(tk._on_device(here), contextlib.nullcontext)


def test_functional_calls_the_kernels_past_its_own_checks():
    """bnlib.functional.batch_norm makes the argument checks, then calls the
    kernels' entry that skips them (on CUDA only, so checked here by name)."""
    import inspect

    import bnlib.functional as bnF

    assert "triton._checked_batch_norm(" in inspect.getsource(bnF.batch_norm)
    assert "check_batch_norm_args(" not in inspect.getsource(tk._checked_batch_norm)
    assert "check_batch_norm_args(" in inspect.getsource(tk.batch_norm)


@pytest.mark.skipif(INTERPRET, reason="this is the subprocess already")
def test_interpreter_suite():
    """Every ``interp`` test below, through Triton's interpreter on CPU tensors."""
    if tk._TRITON_VERSION < tk.MIN_TRITON:
        pytest.skip(f"Triton {triton.__version__} is older than bnlib's MIN_TRITON {tk.MIN_TRITON}: bnlib does not use it")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    error = _interpreter_runs_loops(env)
    if error is not None and "0-dimensional arrays" in error:
        import numpy

        pytest.skip(f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} "
                    f"(triton-lang/triton#9171): {error}")
    assert error is None, f"Triton's interpreter cannot run a loop: {error}"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not interpreter_suite"]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=600)
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and " failed" not in proc.stdout, report


@interp
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape, layout", SHAPES, ids=[f"{len(s)}d-{l}" for s, l in SHAPES])
def test_train_matches_torch(shape, layout, config):
    check(run_both(shape, torch.float64, "cpu", layout, config=config), torch.float64)


@interp
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_train_float32(layout, config):
    check(run_both((3, 4, 5, 6), torch.float32, "cpu", layout, config=config), torch.float32)


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_train_half_precision(dtype, config):
    check(run_both((3, 4, 5, 6), dtype, "cpu", "channels_last", config=config), dtype)
    check(run_both((4, 3, 10), dtype, "cpu", config=config), dtype)


@interp
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_matches_torch(layout, config):
    check(run_both((3, 4, 5, 6), torch.float64, "cpu", layout, training=False, config=config), torch.float64)


@interp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_affine(training):
    check(run_both((4, 3, 10), torch.float64, "cpu", training=training, affine=False, config=SPLITS), torch.float64)


@interp
def test_training_without_running_stats():
    check(run_both((3, 4, 5, 6), torch.float64, "cpu", running=False, config=SPLITS), torch.float64)


@interp
@pytest.mark.parametrize("shape, layout", [((7, 5), "contiguous"), ((4, 3, 10), "contiguous"),
                                           ((3, 4, 5, 6), "channels_last")], ids=["2d", "3d", "4d-channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merged_splits_equal_finalize_kernel(shape, layout, dtype):
    """Merging the splits in the elementwise kernels gives, bit for bit, what the finalize kernels give.

    Both merge the same partial results in the same order (one step of up to
    256 splits, started from an empty summary), so nothing may differ.
    """
    _, R, C, S = tk._rcs_view(make_input(shape, dtype, "cpu", layout))
    assert tk._launch(R, C, S, dtype, torch.device("cpu"), SPLITS).fuse_finalize
    assert not tk._launch(R, C, S, dtype, torch.device("cpu"), SPLITS_FINALIZE).fuse_finalize
    fused = run_both(shape, dtype, "cpu", layout, config=SPLITS)
    finalize = run_both(shape, dtype, "cpu", layout, config=SPLITS_FINALIZE)
    for name, (got, _) in fused.items():
        assert torch.equal(got, finalize[name][0]), name


@interp
def test_merged_splits_skip_the_finalize_kernels(monkeypatch):
    """Up to fuse_finalize_max_splits splits no finalize kernel runs; above it, both do."""
    launched = []
    for name in ("_finalize_stats_kernel", "_finalize_grad_sums_kernel"):
        kernel = getattr(tk, name)

        class Counted:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launched.append(name)
                return kernel[grid]

        monkeypatch.setattr(tk, name, Counted())
    x = make_input((6, 4, 5), torch.float32, "cpu").requires_grad_()
    w = torch.ones(4, requires_grad=True)
    for max_splits, want in ((3, []), (2, ["_finalize_stats_kernel", "_finalize_grad_sums_kernel"])):
        launched.clear()
        config = {"n_split": 3, "tile": 8, "max_block_s": 4, "fuse_finalize_max_splits": max_splits}
        assert tk._launch(6, 4, 5, torch.float32, x.device, config).fuse_finalize == (not want)
        tk.batch_norm(x, torch.zeros(4), torch.ones(4), w, None, True, config=config).sum().backward()
        assert launched == want


@interp
@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.3])
def test_momentum(momentum):
    check(run_both((7, 5), torch.float64, "cpu", momentum=momentum, config=ONE_SPLIT), torch.float64)


def _nan_rule(device, config):
    """NaN in channel 1 and Inf in channel 2: those keep their running stats, the others update."""
    x = make_input((4, 4, 3, 3), torch.float32, device)
    x[1, 1, 0, 2] = float("nan")
    x[2, 2, 1, 1] = float("inf")
    rm = torch.zeros(4, device=device)
    rv = torch.ones(4, device=device)
    y = tk.batch_norm(x, rm, rv, None, None, True, 0.5, 1e-5, config=config)
    ok = [0, 3]
    sub_rm, sub_rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    F.batch_norm(x[:, ok].cpu().double(), sub_rm, sub_rv, training=True, momentum=0.5)
    assert torch.equal(rm[[1, 2]].cpu(), torch.zeros(2)), rm
    assert torch.equal(rv[[1, 2]].cpu(), torch.ones(2)), rv
    assert rel_err(rm[ok], sub_rm) < 1e-5 and rel_err(rv[ok], sub_rv) < 1e-5
    assert torch.isnan(y[:, 1:3]).all(), "the math says NaN for the channels the NaN or Inf reaches"
    assert torch.isfinite(y[:, ok]).all()


@interp
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, inside the interpreter, on inf - inf
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_nan_rule(config):
    _nan_rule("cpu", config)


def _stable_variance(device, config):
    """Contract: float32 input with mean 1e4 and std 1 gives a variance within 1e-3 of the float64 one."""
    x = make_input((64, 3, 8, 8), torch.float32, device, mean=1e4, std=1.0)
    rm, rv = torch.zeros(3, device=device), torch.zeros(3, device=device)
    y = tk.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5, config=config)  # momentum 1: running = batch
    want = x.double().cpu().var(dim=(0, 2, 3), unbiased=True)
    assert (rv.double().cpu() / want - 1).abs().max() < 1e-3, (rv, want)
    want_y = F.batch_norm(x.double().cpu(), None, None, training=True)
    assert rel_err(y, want_y) < 1e-3


@interp
@pytest.mark.parametrize("config", [ONE_SPLIT, {"n_split": 3}], ids=["one_split", "splits"])
def test_stable_variance(config):
    _stable_variance("cpu", config)


@interp
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_stable_variance_of_a_few_values_per_lane(config):
    """float32 values near 1e4, two per lane and per split: merged as they
    were, the lanes' float32 means (rounded by up to 5e-4) put 1.2e-3 of
    relative error into a variance of 0.87 (the contract allows 1e-3).
    Summed as differences from each channel's first value, 3e-8."""
    g = torch.Generator().manual_seed(27)
    x = (torch.randn(6, 64, 2, generator=g, dtype=torch.float64) + 1e4).float()
    rm, rv = torch.zeros(64), torch.zeros(64)
    tk.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5, config=config)
    want = x.double().var(dim=(0, 2), unbiased=True)
    assert ((rv.double() / want - 1).abs().max()) < 1e-5
    assert ((rm.double() - x.double().mean((0, 2))).abs().max()) < 1e-3  # the mean's own rounding: 5e-4


@interp
def test_float64_running_estimates_of_a_float32_input_are_updated_in_float64():
    """At momentum 0 they must not change at all (they were rounded through
    float32: 0.1 became 0.10000000149)."""
    rm = torch.tensor([0.1, 1.000000000001, 3.141592653589793], dtype=torch.float64)
    rv = torch.tensor([0.3, 2.000000000001, 2.718281828459045], dtype=torch.float64)
    before = rm.clone(), rv.clone()
    tk.batch_norm(make_input((8, 3), torch.float32, "cpu"), rm, rv, None, None, True, 0.0, 1e-5)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@interp
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_huge_finite_mean(config):
    """A finite float32 batch of mean 3e19 (its variance 1e30): the merge of
    an empty summary with a block's took 0 * delta^2, and delta^2 overflowed
    to inf (inf * 0 = NaN): NaN output, and the channel's running estimates
    kept as if the batch held a NaN. Now y and the estimates are torch's.
    (Since the statistics are of x minus the channel's first value, this
    input no longer gives that merge a large delta; the merge's own guard is
    tested by test_merge_with_an_empty_summary.)"""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(8, 1, 128, generator=g, dtype=torch.float64) * 1e15 + 3e19
    rm, rv = torch.zeros(1), torch.ones(1)
    y = tk.batch_norm(x64.float(), rm, rv, None, None, True, 0.1, 1e-5, config=config)
    want_rm, want_rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    want = F.batch_norm(x64.float().double(), want_rm, want_rv, None, None, True, 0.1, 1e-5)
    # (the float32 mean is good to an ulp of 3e19, 2e12: 2e-3 of the std)
    assert torch.isfinite(y).all() and rel_err(y, want) < 1e-2
    # (the contract: within 1e-3 of the float64 variance when the mean dwarfs the spread)
    assert abs(rv.item() / want_rv.item() - 1) < 1e-3 and abs(rm.item() / want_rm.item() - 1) < 1e-6


import triton.language as tl  # noqa: E402  (after the importorskip)


@triton.jit
def _tile_offsets_probe(out_ptr, C, S, s_r, s_c, BLOCK_S: tl.constexpr):
    """Channel program_id(0)'s first BLOCK_S offsets from _tile, 64-bit."""
    c_offs = tl.program_id(0) + tl.arange(0, 1)
    offs, _ = tk._tile(0, 0, 1, c_offs, s_r, s_c, C, S, 1, BLOCK_S, True)
    tl.store(out_ptr + tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)[None, None, :], offs.to(tl.int64))


@triton.jit
def _chan_combine_probe(a_ptr, b_ptr, out_ptr):
    """_chan_combine of the summaries (mean, M2, count) at a_ptr and b_ptr, into out_ptr."""
    i = tl.arange(0, 1)
    mean, m2, n = tk._chan_combine(tl.load(a_ptr + i), tl.load(a_ptr + 1 + i), tl.load(a_ptr + 2 + i),
                                   tl.load(b_ptr + i), tl.load(b_ptr + 1 + i), tl.load(b_ptr + 2 + i))
    tl.store(out_ptr + i, mean)
    tl.store(out_ptr + 1 + i, m2)
    tl.store(out_ptr + 2 + i, n)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# (the interpreter evaluates both sides of tl.where: NumPy warns of the inf)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_merge_with_an_empty_summary(dtype):
    """An empty side leaves the other summary as it is, even when delta^2
    would overflow (3e19 in float32, 3e154 in float64: 0 * inf is NaN); two
    non-empty sides follow Chan's formula."""
    huge = 3e19 if dtype == torch.float32 else 3e154
    empty = torch.tensor([0.0, 0.0, 0.0], dtype=dtype)
    block = torch.tensor([huge, 5.0, 4.0], dtype=dtype)
    out = torch.empty(3, dtype=dtype)
    for a, b in ((empty, block), (block, empty)):
        _chan_combine_probe[(1,)](a, b, out)
        assert out.tolist() == block.tolist()
    # {1, 3} and {6, 8, 10}: mean 5.6, M2 = 2 + 8 + 2 * 3 / 5 * (8 - 2)^2
    _chan_combine_probe[(1,)](torch.tensor([2.0, 2.0, 2.0], dtype=dtype),
                              torch.tensor([8.0, 8.0, 3.0], dtype=dtype), out)
    assert out.tolist() == pytest.approx([5.6, 2.0 + 8.0 + 2 * 3 / 5 * 36, 5.0], rel=1e-6)


@interp
def test_tile_offsets_past_int32():
    """A contiguous (1, 3, 2**30) float16 input (6 GiB): channel 2 starts at
    element 2**31, past int32; with 64-bit offsets the channel's term is 64-bit too."""
    launch = tk._launch(1, 3, 2**30, torch.float16, torch.device("cpu"))
    assert launch.common["INT64"]
    out = torch.zeros(3 * 4, dtype=torch.int64)
    _tile_offsets_probe[(3,)](out, 3, 2**30, launch.s_r, launch.s_c, BLOCK_S=4)
    assert out.view(3, 4)[:, 0].tolist() == [0, 2**30, 2**31]
    assert out[8:].tolist() == [2**31 + i for i in range(4)]


@interp
def test_dy_in_another_layout():
    """A channels-last input whose gradient arrives contiguous (and one with stride 0)."""
    x = make_input((3, 4, 5, 6), torch.float64, "cpu", "channels_last").requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    dy = make_input((3, 4, 5, 6), torch.float64, "cpu", seed=5)
    for grad in (dy, torch.ones(1, dtype=torch.float64).expand(3, 4, 5, 6)):
        got = torch.autograd.grad(tk.batch_norm(x, None, None, training=True, config=SPLITS), x, grad)[0]
        want = torch.autograd.grad(F.batch_norm(x2, None, None, training=True), x2, grad)[0]
        assert rel_err(got, want) < 1e-12 or want.abs().max() < 1e-12 and got.abs().max() < 1e-12


@interp
def test_non_contiguous_input_and_running_stats():
    """Other strides are copied; strided running stats are still updated in place."""
    x = make_input((4, 6, 5), torch.float64, "cpu").transpose(0, 2)  # (5, 6, 4), neither layout
    buf = torch.zeros(2, 6, dtype=torch.float64)
    rm, rv = buf[0], torch.ones(12, dtype=torch.float64)[::2]
    ref_rm, ref_rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    y = tk.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    want = F.batch_norm(x, ref_rm, ref_rv, None, None, True, 0.1, 1e-5)
    assert rel_err(y, want) < 1e-12
    assert rel_err(rm, ref_rm) < 1e-12 and rel_err(rv, ref_rv) < 1e-12


@interp
def test_bad_input_changes_nothing():
    C = 3
    rm, rv = torch.zeros(C), torch.ones(C)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tk.batch_norm(torch.randn(1, C), rm, rv, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tk.batch_norm(torch.randn(1, C, 1, 1), rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean should have 4 elements"):
        tk.batch_norm(torch.randn(4, C + 1), rm, rv, training=True)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        tk.batch_norm(torch.randn(5), rm, rv, training=True)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        tk.batch_norm(torch.randn(4, C), None, None, training=False)
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
        tk.batch_norm(torch.ones(4, C, dtype=torch.int32), rm, rv, training=True)
    # bnlib.functional's rules hold at this entry point too: an integer
    # estimate was truncated, training="False" trained
    int_rm = torch.zeros(C, dtype=torch.long)
    with pytest.raises(ValueError, match="running_mean should be a floating-point tensor"):
        tk.batch_norm(torch.randn(8, C) + 5, int_rm, torch.ones(C), training=True, momentum=0.5)
    with pytest.raises(ValueError, match="training to be a bool"):
        tk.batch_norm(torch.randn(8, C) + 5, rm, rv, training="False", momentum=0.5)
    assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C))
    assert torch.equal(int_rm, torch.zeros(C, dtype=torch.long))


@interp
def test_empty_batch():
    """N = 0: an empty output, as torch; the running stats stay as they were."""
    rm, rv = torch.zeros(3), torch.ones(3)
    w = torch.ones(3, requires_grad=True)
    y = tk.batch_norm(torch.randn(0, 3, 4), rm, rv, w, None, training=True)
    assert y.shape == (0, 3, 4) and y.requires_grad
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@interp
def test_is_available_under_interpreter():
    assert tk.is_available()


@interp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_without_autograd(training, layout):
    """Under no_grad the kernels run without an autograd node: same y and running stats."""
    x = make_input((4, 3, 5, 6), torch.float32, "cpu", layout)
    w, b = torch.randn(3), torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    with torch.no_grad():
        y = tk.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    assert y.grad_fn is None and y.stride() == x.stride()
    y2 = tk.batch_norm(x, rm2, rv2, w.requires_grad_(), b, training, 0.1, 1e-5)
    assert y2.grad_fn is not None
    assert torch.equal(y, y2.detach()) and torch.equal(rm, rm2) and torch.equal(rv, rv2)


def test_old_triton_is_not_used(monkeypatch):
    """A Triton older than MIN_TRITON: is_available() is False, batch_norm says why, and
    bnlib.functional warns once and computes with tensor ops."""
    if tk.triton is None:
        pytest.skip("needs Triton")
    from bnlib import functional as bnF

    assert tk._version_tuple("3.6.0") == (3, 6) and tk._version_tuple("3.2.0+git1a2b") == (3, 2)
    monkeypatch.setattr(tk, "_TRITON_VERSION", (3, 1))
    assert not tk.is_available()
    with pytest.raises(RuntimeError, match=r"needs Triton >= 3\.2"):
        tk.batch_norm(torch.randn(4, 3), None, None, training=True)
    monkeypatch.setattr(bnF, "_warned", set())
    with pytest.warns(RuntimeWarning, match="tensor-op path"):
        assert bnF._triton_path() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only: a second warning would raise here
        assert bnF._triton_path() is None


@interp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_second_derivatives(training, layout):
    """create_graph=True: gradients that can be differentiated again, and
    their derivatives (with respect to x, w, b and dy, along a random
    direction) equal torch's own double backward in float64. (gradcheck's
    finite differences would launch the kernels hundreds of times, seconds
    each under the interpreter; tests/test_double_backward.py checks the
    formulas this path shares against finite differences.)"""
    g = torch.Generator().manual_seed(5)
    x = make_input((2, 2, 3, 2), torch.float64, "cpu", layout)
    w = torch.rand(2, dtype=torch.float64, generator=g) + 0.5
    b = torch.randn(2, dtype=torch.float64, generator=g)
    dy = torch.randn(2, 2, 3, 2, dtype=torch.float64, generator=g)
    rm, rv = torch.randn(2, dtype=torch.float64, generator=g), torch.rand(2, dtype=torch.float64, generator=g) + 0.5
    directions = [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in (x, w, b)]
    second = {}
    for name, fn in (("tk", tk.batch_norm), ("torch", F.batch_norm)):
        inputs = [t.detach().clone().requires_grad_() for t in (x, w, b, dy)]
        y = fn(*inputs[:1], rm.clone(), rv.clone(), *inputs[1:3], training, 0.1, 1e-5)
        first = torch.autograd.grad(y, inputs[:3], inputs[3], create_graph=True)
        along = sum((f * v).sum() for f, v in zip(first, directions))
        second[name] = [*first, *torch.autograd.grad(along, inputs, allow_unused=True)]
    for ours, theirs in zip(second["tk"], second["torch"]):
        if theirs is None:  # eval mode: dx does not depend on x, nor dw on w
            assert ours is None or ours.abs().max() < 1e-12
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@interp
def test_forward_ad_takes_the_formula_path():
    """A dual tensor (forward-mode AD): the kernels' Function has no jvp, so
    the formulas in tensor ops compute it (as under torch.func), before any
    running estimate is touched; the tangent and the estimates are torch's."""
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    stats = {name: (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)) for name in ("tk", "torch")}
    tangents = {}
    for name, fn in (("tk", tk.batch_norm), ("torch", F.batch_norm)):
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, t), *stats[name], None, None, True)
            tangents[name] = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(tangents["tk"], tangents["torch"])
    for ours, theirs in zip(stats["tk"], stats["torch"]):
        torch.testing.assert_close(ours, theirs)


@interp
def test_direct_call_checks_what_torch_checks():
    """Called directly (not through bnlib.functional), the Triton entry point
    refuses what torch refuses in training, and changes nothing."""
    x, rm, rv = torch.randn(6, 3), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="both given or both None"):
        tk.batch_norm(x, rm, None, training=True)
    with pytest.raises(ValueError, match="eps > 0"):
        tk.batch_norm(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        tk.batch_norm(x, rm, rv, training=True, momentum=None)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    torch.testing.assert_close(tk.batch_norm(x, rm, rv, momentum=None), F.batch_norm(x, rm, rv))


# Every kernel variant a training step, an eval call and their backward can
# launch, compiled for an H100 (sm_90) by Triton's own compiler and ptxas:
# no GPU is needed to compile, and the interpreter accepts code the compiler
# rejects. (layout, dtype, overrides of CONFIG) -> kernels of _forward and
# _TritonBatchNorm.backward.
_HOPPER_CASES = [
    ("nchw", torch.float32, {"n_split": 1}, {}),
    ("nchw", torch.bfloat16, {"n_split": 8}, {}),
    ("nhwc", torch.float32, {"n_split": 8, "prefetch": True}, {}),
    ("nhwc", torch.float16, {"n_split": 128}, {}),  # past fuse_finalize_max_splits: the finalize kernels
    # float64 (float64 statistics), a layer without weight, bias or running
    # statistics, and 64-bit offsets (inputs of 2**31 elements or more)
    ("nchw", torch.float64, {"n_split": 8}, {}),
    ("nhwc", torch.float32, {"n_split": 1}, {"affine": False, "running": False}),
    ("nchw", torch.float16, {"n_split": 8, "fuse_finalize_max_splits": 0}, {"int64": True}),
]


def _hopper_kernels(layout, dtype, overrides, variant):
    """(kernel, pointer dtypes, constexprs, num_warps) of one case, with the
    block sizes _Launch picks; every other pointer is of the statistics'
    dtype (float64 for float64 input, else float32)."""
    R, C, S = (64, 256, 196) if layout == "nchw" else (64 * 196, 256, 1)
    launch = tk._Launch(R, C, S, dtype, torch.device("cpu"), overrides)
    x = {torch.float64: "*fp64", torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    common = {k: v for k, v in launch.common.items() if k != "num_warps"}
    if variant.get("int64"):
        common["INT64"] = True
    affine, running = variant.get("affine", True), variant.get("running", True)
    parts = "fuse" if launch.fuse_finalize else ("finalize" if launch.n_split > 1 else "one")
    split = {"BLOCK_SPLIT": launch.BLOCK_SPLIT if parts == "fuse" else 1}
    final = {"BLOCK_C": launch.BLOCK_C_FINAL, "BLOCK_SPLIT": launch.BLOCK_SPLIT}
    warps = launch.num_warps
    out = []
    if parts != "one":
        out.append((tk._partial_stats_kernel, {"x_ptr": x}, common, warps))
        out.append((tk._partial_grad_sums_kernel, {"x_ptr": x, "dy_ptr": x}, common, warps))
    if parts == "finalize":  # (launched with Triton's default of 4 warps)
        out.append((tk._finalize_stats_kernel, {"x_ptr": x},
                    {**final, "UPDATE_RMEAN": running, "UPDATE_RVAR": running}, 4))
        out.append((tk._finalize_grad_sums_kernel, {}, final, 4))
    stats, sums = {"one": (tk._COMPUTE, tk._COMPUTE), "fuse": (tk._FROM_PARTS, tk._FROM_PARTS),
                   "finalize": (tk._FROM_BUFFER, tk._FROM_BUFFER)}[parts]
    for mode, training in ((stats, True), (tk._RUNNING, False)):
        out.append((tk._normalize_kernel, {"x_ptr": x, "y_ptr": x},
                    {**common, **split, "STATS": mode, "HAS_W": affine, "HAS_B": affine,
                     "UPDATE_RMEAN": training and running, "UPDATE_RVAR": training and running}, warps))
    for mode, training in ((sums, True), (tk._NONE, False)):
        out.append((tk._grad_input_kernel, {"x_ptr": x, "dy_ptr": x, "dx_ptr": x},
                    {**common, **split, "SUMS": mode, "TRAINING": training, "HAS_W": affine}, warps))
    return out, "*fp64" if dtype == torch.float64 else "*fp32"


@pytest.mark.skipif(INTERPRET, reason="compiles the kernels; under TRITON_INTERPRET they are interpreted")
@pytest.mark.parametrize("layout, dtype, overrides, variant", _HOPPER_CASES,
                         ids=[f"{l}-{str(d)[6:]}-{o}-{v}" for l, d, o, v in _HOPPER_CASES])
def test_kernels_compile_for_hopper(layout, dtype, overrides, variant):
    """Each kernel the case launches compiles to a cubin for sm_90, without a GPU."""
    import inspect

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"Triton {triton.__version__} has no compiler API here: {e}")
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip(f"Triton {triton.__version__}'s ASTSource takes constants another way")
    if tk._TRITON_VERSION < tk.MIN_TRITON:
        pytest.skip(f"Triton {triton.__version__} is older than MIN_TRITON")
    kernels, acc_pointer = _hopper_kernels(layout, dtype, overrides, variant)
    for kernel, pointers, constexprs, num_warps in kernels:
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointers.get(name, acc_pointer)  # statistics, parameters, buffers
            else:
                signature[name] = "fp32" if name in ("momentum", "eps") else "i32"
        _assert_compiles(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                         GPUTarget("cuda", 90, 32), {"num_warps": num_warps}, kernel.fn.__name__)


def _assert_compiles(src, target, options, what):
    """``src`` compiles to a cubin for ``target`` (a skip where this Triton has no ptxas)."""
    try:
        compiled = triton.compile(src, target=target, options=options)
    except RuntimeError as e:
        if "ptxas" in str(e) and "not found" in str(e).lower():
            pytest.skip(f"no ptxas in this Triton: {e}")
        raise
    assert compiled.asm.get("cubin"), f"{what}: no cubin"



# The launches of real calls, captured instead of run: bnlib's own host code
# picks the kernels, block sizes and grids (with an H100's 132 SMs), and
# Triton's own binder specializes the arguments as a launch on a GPU would
# (an integer equal to 1 becomes a constant, multiples of 16 and 16-byte
# aligned pointers are marked so). The shapes: ResNet-50's at batch 64,
# (4096, 1024), and small ones whose sizes or strides are 1.
_LAUNCH_SHAPES = [(64, 64, 112, 112), (64, 256, 56, 56), (64, 512, 28, 28), (64, 256, 14, 14),
                  (64, 2048, 7, 7), (4096, 1024), (3, 5, 7, 7), (5, 3), (2, 1), (2, 3, 1, 1), (1, 7, 3, 3)]


def _captured_launches(monkeypatch, backend):
    """Every distinct (kernel, signature, constants, attributes, options) that
    training and eval calls, forward and backward, launch over _LAUNCH_SHAPES
    in every dtype and layout, with and without weight, bias and running
    statistics: one launch per kernel, set of constant arguments, way of
    getting the statistics or sums, and prefetch (the dtypes and the other
    flags are test_kernels_compile_for_hopper's; all 467 distinct launches
    took 3 minutes to compile here)."""
    from triton.runtime.jit import create_function_from_signature

    kernels = [tk._partial_stats_kernel, tk._finalize_stats_kernel, tk._normalize_kernel,
               tk._partial_grad_sums_kernel, tk._finalize_grad_sums_kernel, tk._grad_input_kernel]
    groups = {}

    def capture(kernel):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        declared = {p.name for p in kernel.params if p.is_constexpr}

        def run(*args, grid, warmup, **kwargs):
            kwargs = dict(kwargs, debug=False)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            ones = tuple(n for n, t in signature.items() if t == "constexpr" and n not in declared)
            key = (kernel.fn.__name__, ones, bound.get("STATS"), bound.get("SUMS"), bound.get("PREFETCH"))
            groups.setdefault(key, (kernel, signature, constexprs, attrs, options))
        return run

    for kernel in kernels:
        monkeypatch.setattr(kernel, "run", capture(kernel))
    monkeypatch.setattr(tk, "_INTERPRET", True)  # let CPU tensors through to the (captured) launches
    monkeypatch.setitem(tk._SMS, torch.device("cpu"), 132)
    monkeypatch.setattr(tk, "_LAUNCHES", {})
    for shape in _LAUNCH_SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            layouts = (torch.contiguous_format, torch.channels_last) if len(shape) == 4 else (torch.contiguous_format,)
            for layout in layouts:
                x = torch.empty(shape, dtype=dtype).to(memory_format=layout).requires_grad_(True)
                C, acc = shape[1], tk._acc_dtype(dtype)
                for affine, running in ((True, True), (False, False)):
                    w, b = ((torch.ones(C, dtype=dtype, requires_grad=True), torch.zeros(C, dtype=dtype, requires_grad=True))
                            if affine else (None, None))
                    rm, rv = (torch.zeros(C, dtype=acc), torch.ones(C, dtype=acc)) if running else (None, None)
                    for training in (True, False) if running else (True,):
                        y = tk.batch_norm(x, rm, rv, w, b, training=training)
                        torch.autograd.grad(y, [x] + ([w, b] if affine else []), torch.empty_like(y))
    return list(groups.values())


@pytest.mark.skipif(INTERPRET, reason="compiles the kernels; under TRITON_INTERPRET they are interpreted")
def test_launches_compile_for_hopper(monkeypatch):
    """What real calls launch compiles to a cubin for sm_90, with the launch's
    own specializations (test_kernels_compile_for_hopper compiles plain i32s)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        tk._partial_stats_kernel._pack_args  # noqa: B018
    except (ImportError, AttributeError, RuntimeError) as e:
        pytest.skip(f"Triton {triton.__version__} binds launches another way: {e}")
    if tk._TRITON_VERSION < tk.MIN_TRITON:
        pytest.skip(f"Triton {triton.__version__} is older than MIN_TRITON")
    launches = _captured_launches(monkeypatch, backend)
    names = {kernel.fn.__name__ for kernel, *_ in launches}
    assert len(names) == 6, names  # every kernel was launched
    sizes = {"R", "C", "S", "s_c"}
    ones = {n for _, signature, *_ in launches for n, t in signature.items() if t == "constexpr" and n in sizes}
    assert ones == sizes, ones  # and arguments equal to 1 were made constants
    for kernel, signature, constexprs, attrs, options in launches:
        _assert_compiles(ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__,
                         f"{kernel.fn.__name__} {signature}")

def test_launch_cache():
    """A problem's launch is worked out once, and again when CONFIG or the overrides change."""
    if tk.triton is None:
        pytest.skip("needs Triton")
    cpu = torch.device("cpu")
    a = tk._launch(64, 8, 49, torch.float32, cpu)
    assert tk._launch(64, 8, 49, torch.float32, cpu) is a
    assert tk._launch(64, 8, 49, torch.float32, cpu, {"n_split": 2}) is not a
    assert tk._launch(64, 8, 49, torch.float32, cpu, {"n_split": 2}).n_split == 2
    assert tk._launch(64, 8, 49, torch.float16, cpu) is not a
    saved = dict(tk.CONFIG)
    try:
        tk.CONFIG["tile"] = 64
        b = tk._launch(64, 8, 49, torch.float32, cpu)
        assert b is not a and b.BLOCK_R * b.BLOCK_S <= 64
    finally:
        tk.CONFIG.clear()
        tk.CONFIG.update(saved)
    assert tk._launch(64, 8, 49, torch.float32, cpu) is a
    small = tk._launch(4096, 64, 1, torch.float32, cpu)  # a channels-last problem below SMALL_CHANNELS_LAST_ELEMENTS
    saved_small = dict(tk.SMALL_CHANNELS_LAST)
    try:
        tk.SMALL_CHANNELS_LAST["block_c"] = 8
        assert tk._launch(4096, 64, 1, torch.float32, cpu).BLOCK_C == 8
    finally:
        tk.SMALL_CHANNELS_LAST.clear()
        tk.SMALL_CHANNELS_LAST.update(saved_small)
    assert tk._launch(4096, 64, 1, torch.float32, cpu) is small
    assert (a.s_r, a.s_c) == (8 * 49, 49)
    assert (tk._launch(64 * 49, 8, 1, torch.float32, cpu).s_r, tk._launch(64 * 49, 8, 1, torch.float32, cpu).s_c) == (8, 1)
    assert [tk._cdiv(n, 4) for n in range(1, 10)] == [math.ceil(n / 4) for n in range(1, 10)]


def test_imports_without_triton(monkeypatch):
    """Without Triton the module still imports, is_available() is False and batch_norm says why."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_bnlib_triton_kernels_without_triton", tk.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    assert module.is_available() is False
    with pytest.raises(RuntimeError, match="needs Triton"):
        module.batch_norm(torch.randn(4, 3), None, None, training=True)


# ---------------------------------------------------------------------------
# CUDA: the compiled kernels
# ---------------------------------------------------------------------------

CUDA_SHAPES = [
    ((64, 32), "contiguous"),
    ((512, 1024), "contiguous"),
    ((8, 16, 100), "contiguous"),
    ((3, 5, 13, 17), "contiguous"),
    ((3, 5, 13, 17), "channels_last"),
    ((16, 64, 7, 7), "contiguous"),
    ((16, 64, 7, 7), "channels_last"),
    ((8, 32, 56, 56), "contiguous"),
    ((8, 32, 56, 56), "channels_last"),
    ((2, 8, 4, 6, 6), "contiguous"),
    ((2, 8, 4, 6, 6), "channels_last"),
]
CUDA_IDS = [f"{'x'.join(map(str, s))}-{l}" for s, l in CUDA_SHAPES]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("shape, layout", CUDA_SHAPES, ids=CUDA_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_matches_torch(shape, layout, dtype, training):
    check(run_both(shape, dtype, "cuda", layout, training=training), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [ONE_SPLIT, {"n_split": 7, "prefetch": True}, {"n_split": 1, "prefetch": True},
                                    {"n_split": 7, "prefetch": False},
                                    {"n_split": 7, "fuse_finalize_max_splits": 0}],
                         ids=["one_split", "7_splits_prefetch", "one_split_prefetch", "7_splits", "7_splits_finalize"])
@pytest.mark.parametrize("shape, layout", CUDA_SHAPES, ids=CUDA_IDS)
def test_cuda_split_paths(shape, layout, config):
    """The one-launch path, the splits merged in the elementwise kernels, and the finalize kernels."""
    check(run_both(shape, torch.float32, "cuda", layout, config=config), torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_matches_native(dtype, layout):
    """Against torch's own CUDA kernels on a ResNet-sized input, in the same dtype."""
    shape = (32, 64, 56, 56)
    x = make_input(shape, dtype, "cuda", layout).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    dy = make_input(shape, dtype, "cuda", layout, mean=0.0, std=1.0, seed=3)
    w = torch.randn(64, device="cuda", requires_grad=True)
    b = torch.randn(64, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    rm2, rv2 = rm.clone(), rv.clone()
    y = tk.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    y2 = F.batch_norm(x2, rm2, rv2, w, b, True, 0.1, 1e-5)
    g = torch.autograd.grad(y, (x, w, b), dy)
    g2 = torch.autograd.grad(y2, (x2, w, b), dy)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    for name, got, want in [("y", y, y2), ("dx", g[0], g2[0]), ("dgamma", g[1], g2[1]), ("dbeta", g[2], g2[2]),
                            ("running_mean", rm, rm2), ("running_var", rv, rv2)]:
        assert rel_err(got, want) < tol, name


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_second_derivatives(training):
    """create_graph=True through the compiled kernels: gradgradcheck in float64."""
    x = make_input((4, 3, 3, 2), torch.float64, "cuda").requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, device="cuda") + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device="cuda").requires_grad_()
    rm = torch.randn(3, dtype=torch.float64, device="cuda")
    rv = torch.rand(3, dtype=torch.float64, device="cuda") + 0.5
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: tk.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5), (x, w, b))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [ONE_SPLIT, {"n_split": 5}], ids=["one_split", "splits"])
def test_cuda_nan_rule(config):
    _nan_rule("cuda", config)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [ONE_SPLIT, {"n_split": 5}], ids=["one_split", "splits"])
def test_cuda_stable_variance(config):
    _stable_variance("cuda", config)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_no_host_sync():
    """The training step (forward, backward, running stats, NaN rule) never waits for the GPU."""
    x = make_input((16, 32, 28, 28), torch.float32, "cuda").requires_grad_()
    rm, rv = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
    w = torch.ones(32, device="cuda", requires_grad=True)
    tk.batch_norm(x, rm, rv, w, None, True).sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for config in (ONE_SPLIT, {"n_split": 4}):
            tk.batch_norm(x, rm, rv, w, None, True, config=config).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(rm.sum().item())


# --- from a mutation run of the kernels in the interpreter (50 mutants, 40
# caught): the cases that let the other ten through ----------------------


def _torch_reference(x, rm, rv, w, b, momentum, eps):
    x2 = x.detach().double().requires_grad_()
    rm2 = None if rm is None else rm.double().clone()
    rv2 = None if rv is None else rv.double().clone()
    w2 = None if w is None else w.detach().double().requires_grad_()
    b2 = None if b is None else b.detach().double().requires_grad_()
    return x2, rm2, rv2, w2, b2, F.batch_norm(x2, rm2, rv2, w2, b2, True, momentum, eps)


@interp
@pytest.mark.parametrize("config", [ONE_SPLIT, SPLITS], ids=["one_split", "splits"])
def test_float64_running_stats_separate_buffers(config):
    """Float64 running estimates, each library with its own buffers (_run_both
    once handed both the same tensors: .to() of a float64 CPU tensor is a no-op)."""
    x = make_input((4, 3, 10), torch.float64, "cpu")
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    tk.batch_norm(x, rm, rv, None, None, True, 0.3, 1e-5, config=config)
    F.batch_norm(x, rm2, rv2, None, None, True, 0.3, 1e-5)
    assert rel_err(rm, rm2) < 1e-7 and rel_err(rv, rv2) < 1e-7


@interp
def test_more_than_256_splits():
    """More than 256 splits: the finalize kernels' second BLOCK_SPLIT step
    (_chan_combine with both sides non-empty)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(514, 1, generator=g, dtype=torch.float64) + torch.arange(514.0, dtype=torch.float64)[:, None] / 100)
    x.requires_grad_()
    config = {"n_split": 257, "tile": 4, "block_c": 1}
    R, C, S = 514, 1, 1
    launch = tk._launch(R, C, S, torch.float64, torch.device("cpu"), config)
    assert launch.n_split == 257 and launch.BLOCK_SPLIT == 256 and not launch.fuse_finalize
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    w = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    y = tk.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, config=config)
    x2, rm2, rv2, w2, b2, y2 = _torch_reference(x, torch.zeros(1), torch.ones(1), w, b, 0.1, 1e-5)
    dy = torch.randn(514, 1, generator=g, dtype=torch.float64)
    g1 = torch.autograd.grad(y, (x, w, b), dy)
    g2 = torch.autograd.grad(y2, (x2, w2, b2), dy)
    assert rel_err(y, y2) < 1e-12
    assert rel_err(rm, rm2) < 1e-7 and rel_err(rv, rv2) < 1e-7
    for a, c in zip(g1, g2):
        assert rel_err(a, c) < 1e-12


@interp
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_stable_variance_channels_of_different_means(config):
    """Each channel shifted by its own first value: channel 0 near 0, the
    others near 1e4 (8 channels: each program costs seconds here)."""
    g = torch.Generator().manual_seed(27)
    x = (torch.randn(6, 8, 2, generator=g, dtype=torch.float64) + 1e4)
    x[:, 0] -= 1e4
    x = x.float()
    rm, rv = torch.zeros(8), torch.zeros(8)
    tk.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5, config=config)
    want = x.double().var(dim=(0, 2), unbiased=True)
    assert ((rv.double() / want - 1).abs().max()) < 1e-5


@interp
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_nan_rule_infinite_variance_finite_mean(config):
    """A float32 channel alternating 0 and 3e19: a finite mean, an infinite
    M2; the NaN rule keeps its running estimates."""
    x = make_input((4, 2, 8), torch.float32, "cpu")
    x[:, 1] = 0.0
    x[:, 1, 1::2] = 3e19
    rm, rv = torch.zeros(2), torch.ones(2)
    tk.batch_norm(x, rm, rv, None, None, True, 0.5, 1e-5, config=config)
    assert rm[1].item() == 0.0 and rv[1].item() == 1.0, (rm, rv)
    want_rm, want_rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    F.batch_norm(x[:, :1].double(), want_rm, want_rv, training=True, momentum=0.5)
    assert rel_err(rm[:1], want_rm) < 1e-5 and rel_err(rv[:1], want_rv) < 1e-5


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eps_inside_sqrt(dtype):
    """eps of the order of the variance (std 0.01, eps 1e-4): inside the sqrt."""
    x = make_input((4, 3, 10), dtype, "cpu", mean=1.0, std=0.01)
    y = tk.batch_norm(x, None, None, None, None, True, 0.1, 1e-4, config=ONE_SPLIT)
    assert rel_err(y, F.batch_norm(x.double(), None, None, training=True, eps=1e-4)) < 1e-5


@interp
@pytest.mark.parametrize("which", ["weight_only", "bias_only"])
@pytest.mark.parametrize("config", [ONE_SPLIT, SPLITS], ids=["one_split", "splits"])
def test_weight_or_bias_alone(which, config):
    """A weight without a bias and a bias without a weight: y and every gradient."""
    x = make_input((4, 3, 10), torch.float64, "cpu").requires_grad_()
    w = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64, requires_grad=True) if which == "weight_only" else None
    b = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True) if which == "bias_only" else None
    y = tk.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, config=config)
    x2, _, _, w2, b2, y2 = _torch_reference(x, None, None, w, b, 0.1, 1e-5)
    dy = make_input((4, 3, 10), torch.float64, "cpu", mean=0.0, std=1.0, seed=2)
    p1 = [t for t in (x, w, b) if t is not None]
    p2 = [t for t in (x2, w2, b2) if t is not None]
    assert rel_err(y, y2) < 1e-12
    for a, c in zip(torch.autograd.grad(y, p1, dy), torch.autograd.grad(y2, p2, dy)):
        assert rel_err(a, c) < 1e-12


# --- from a second mutation run of the kernels in the interpreter (65
# mutants): the cases that let real gaps through --------------------------


@interp
@pytest.mark.parametrize("config", [{**ONE_SPLIT, "tile": 8, "block_c": 2, "max_block_s": 4},
                                    {**SPLITS, "prefetch": False}], ids=["one_split", "splits"])
@pytest.mark.parametrize("shape, layout", [((4, 3, 10), "contiguous"), ((3, 4, 5, 6), "channels_last")],
                         ids=["3d", "4d-channels_last"])
def test_several_tiles_without_prefetch(shape, layout, config):
    """Several tiles per program without prefetching: the backward loops load
    each tile after the first themselves (the other configurations with
    several tiles per program prefetch)."""
    check(run_both(shape, torch.float64, "cpu", layout, config=config), torch.float64)


@interp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_parameter_gradients_without_input_gradient(config, training):
    """Only weight and bias want gradients (x is data: BN as a network's first
    layer): the sums are reduced although no dx is computed."""
    x = make_input((4, 3, 10), torch.float64, "cpu")
    w = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    rm, rv = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64), torch.tensor([1.5, 9.0, 4.0], dtype=torch.float64)
    dy = make_input((4, 3, 10), torch.float64, "cpu", mean=0.0, std=1.0, seed=2)
    y = tk.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, config=config)
    want = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
    for name, got, ref in zip(("dgamma", "dbeta"), torch.autograd.grad(y, (w, b), dy),
                              torch.autograd.grad(want, (w, b), dy)):
        assert rel_err(got, ref) < 1e-12, name


@interp
@pytest.mark.parametrize("config", [ONE_SPLIT, SPLITS], ids=["one_split", "splits"])
def test_strided_weight_and_bias(config):
    """Weight and bias that are strided views (every other element of one
    tensor): the kernels read per-channel tensors with stride 1, so they get
    contiguous copies; y and the gradients are torch's."""
    x = make_input((4, 3, 10), torch.float64, "cpu").requires_grad_()
    wb = torch.tensor([1.5, 0.3, -0.5, -1.0, 2.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = tk.batch_norm(x, None, None, wb[0::2], wb[1::2], True, 0.1, 1e-5, config=config)
    x2 = x.detach().clone().requires_grad_()
    wb2 = wb.detach().clone().requires_grad_()
    y2 = F.batch_norm(x2, None, None, wb2[0::2], wb2[1::2], True, 0.1, 1e-5)
    assert rel_err(y, y2) < 1e-12
    dy = make_input((4, 3, 10), torch.float64, "cpu", mean=0.0, std=1.0, seed=2)
    for got, ref in zip(torch.autograd.grad(y, (x, wb), dy), torch.autograd.grad(y2, (x2, wb2), dy)):
        assert rel_err(got, ref) < 1e-12


@interp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_subtracts_the_mean_first(layout):
    """Eval with |mean| >> std (float32 values near 1e5, std 1): y = (x -
    running_mean) * scale + beta keeps y to float32's precision; x * scale -
    running_mean * scale would lose three digits of it (an ulp of 1e5 * scale)."""
    x = make_input((3, 4, 5, 6), torch.float32, "cpu", layout, mean=1e5, std=1.0)
    rm, rv = torch.full((4,), 1e5), torch.tensor([1.0, 0.5, 2.0, 1.5])
    w, b = torch.tensor([1.5, -0.5, 2.0, 1.0]), torch.tensor([0.3, -1.0, 2.0, 0.0])
    y = tk.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    want = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False, 0.1, 1e-5)
    assert rel_err(y, want) < 1e-5


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_half_input_keeps_float32_statistics(dtype, config):
    """Half input whose mean dwarfs its spread (mean 1000, std 4): the saved
    mean and invstd (the finalize kernel's output, the backward's input) are
    float32; in the input's dtype the mean would be off by up to half an ulp
    of 1000 (0.25 in float16, 2 in bfloat16), y and dx by that over the std."""
    x = make_input((4, 3, 10), dtype, "cpu", mean=1000.0, std=4.0).requires_grad_()
    dy = make_input((4, 3, 10), dtype, "cpu", mean=0.0, std=1.0, seed=2)
    y = tk.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, config=config)
    x2 = x.detach().double().requires_grad_()
    y2 = F.batch_norm(x2, None, None, None, None, True, 0.1, 1e-5)
    assert rel_err(y, y2) < TOL[dtype]
    got, want = torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y2, x2, dy.double())[0]
    assert rel_err(got, want) < TOL[dtype]


@interp
def test_non_contiguous_input_backward():
    """An input in neither layout (a copy for the kernels): the backward reads
    that copy too, not the input with its own strides."""
    x = make_input((4, 6, 5), torch.float64, "cpu").transpose(0, 2).requires_grad_()  # (5, 6, 4)
    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64, requires_grad=True)
    b = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64, requires_grad=True)
    dy = make_input((5, 6, 4), torch.float64, "cpu", mean=0.0, std=1.0, seed=2)
    for config in (ONE_SPLIT, SPLITS):
        y = tk.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, config=config)
        want = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        for got, ref in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy)):
            assert rel_err(got, ref) < 1e-12


@interp
def test_half_running_estimates_are_rounded_once():
    """float16 running estimates are updated in float32 and rounded once: each
    within half an ulp (float16) of the float64 update (computed in float16,
    each of its three roundings would add to that)."""
    x = make_input((16, 64), torch.float16, "cpu")
    g = torch.Generator().manual_seed(5)
    rm = (torch.randn(64, generator=g) * 3).half()
    rv = (torch.rand(64, generator=g) * 4 + 1).half()
    want_rm = 0.7 * rm.double() + 0.3 * x.double().mean(0)
    want_rv = 0.7 * rv.double() + 0.3 * x.double().var(0, unbiased=True)
    tk.batch_norm(x, rm, rv, None, None, True, 0.3, 1e-5, config=ONE_SPLIT)
    for got, want in ((rm, want_rm), (rv, want_rv)):
        ulp = torch.tensor([math.ulp(v) * 2.0**(53 - 11) if v != 0 else 2.0**-24 for v in want.abs().tolist()],
                           dtype=torch.float64)
        assert ((got.double() - want).abs() / ulp).max() <= 0.51


def test_every_split_has_rows():
    """Whole tiles per split, and the split count recomputed from them: no split
    (no program of the grid) is left without rows."""
    if tk.triton is None:
        pytest.skip("needs Triton")
    cpu = torch.device("cpu")
    for R in range(1, 120):
        for n in (2, 3, 5, 7, 11):
            launch = tk._launch(R, 3, 5, torch.float32, cpu, {"n_split": n, "tile": 32, "max_block_s": 4})
            assert launch.rows_per_split % launch.BLOCK_R == 0
            assert (launch.n_split - 1) * launch.rows_per_split < R <= launch.n_split * launch.rows_per_split, (R, n)


def test_launch_cache_is_bounded(monkeypatch):
    """Programs that see ever new shapes: the cache of launches stays at most 1024 entries."""
    if tk.triton is None:
        pytest.skip("needs Triton")
    monkeypatch.setattr(tk, "_LAUNCHES", {})
    for R in range(1, 1100):
        tk._launch(R, 3, 5, torch.float32, torch.device("cpu"))
    assert 0 < len(tk._LAUNCHES) <= 1024


@triton.jit
def _pivot_probe(x_ptr, out_ptr, C, R, S, s_c, BLOCK_C: tl.constexpr):
    """_pivot of channels [0, BLOCK_C), into out_ptr."""
    c_offs = tl.arange(0, BLOCK_C)
    tl.store(out_ptr + c_offs, tk._pivot(x_ptr, c_offs, s_c, C, R, S), mask=c_offs < C)


@interp
def test_pivot_offsets_past_int32():
    """The pivot of channel 2 of a contiguous (1, 3, 2**30) input is element
    2**31, past int32 (test_tile_offsets_past_int32 for _pivot). x is the
    second half of 4 GiB of uint8 (never touched but for four bytes), so that
    an offset wrapped to -2**31 reads buf[0] instead of faulting."""
    buf = torch.empty(2**32 + 1, dtype=torch.uint8)
    buf[0] = 9
    x = buf[2**31:]
    x[0], x[2**30], x[2**31] = 1, 2, 3
    out = torch.zeros(3, dtype=torch.uint8)
    _pivot_probe[(1,)](x, out, 3, 1, 2**30, 2**30, BLOCK_C=4)
    assert out.tolist() == [1, 2, 3]
