"""Shared utilities for bnlib's tests (no fixtures with side effects here).

The truth in these tests is torch's own batch norm (``torch.nn.BatchNorm*d``,
``torch.nn.functional.batch_norm``), finite differences in float64 and closed
forms; bnlib is only ever compared against those, never against itself.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import numpy as np
import torch

# torch 2.13 added a keyword-only ``bias=`` to its normalization modules, and
# to their repr; bnlib follows the pinned 2.13 (see tests/conftest.py).
TORCH_NORMS_TAKE_BIAS = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters

# --------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------
# float64: bnlib and torch reduce in a different order; with at most a few
# hundred elements per channel the results differ by a few ulps (~1e-15
# relative), so 1e-9 leaves a wide margin while still catching any
# algorithmic difference (a wrong n vs n-1 alone is a 1e-2 relative error).
# float32: the same reasoning with eps_f32 ~ 1.2e-7 gives ~1e-6 relative;
# input gradients are a difference of means scaled by 1/std (cancellation),
# so they get a slightly looser absolute tolerance.
OUT_TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
}
STAT_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}

# Shapes per module class: N=2 minimal, C=1, size-1 and odd spatial sizes.
SHAPES = {
    1: [(2, 1), (2, 3), (5, 4), (3, 1, 1), (2, 3, 7), (4, 1, 5), (2, 5, 1)],
    2: [(2, 1, 1, 2), (2, 3, 4, 5), (3, 2, 1, 1), (5, 3, 3, 1)],
    3: [(2, 1, 1, 1, 2), (2, 3, 2, 3, 2), (3, 2, 1, 2, 1)],
}


def torch_bn_class(d: int):
    return {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[d]


def bnlib_bn_class(d: int):
    import bnlib.nn

    return {1: bnlib.nn.BatchNorm1d, 2: bnlib.nn.BatchNorm2d, 3: bnlib.nn.BatchNorm3d}[d]


def dim_of_shape(shape) -> int:
    """Which BatchNorm{d}d takes an input of this shape."""
    return {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]


def torch_bn_for_ndim(ndim: int):
    return torch_bn_class(dim_of_shape((0,) * ndim))


def random_input(shape, dtype=torch.float64, seed=0, spread=True):
    """Normal input with a different mean and std for every channel.

    Stds are kept in [0.5, 3] so the 1/std factors in the backward stay
    moderate and float32 tolerances are meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if spread and len(shape) >= 2 and shape[1] > 0:
        c = shape[1]
        view = [1, c] + [1] * (len(shape) - 2)
        mean = torch.linspace(-2.0, 3.0, c, dtype=torch.float64).view(view)
        std = torch.linspace(0.5, 3.0, c, dtype=torch.float64).view(view)
        x = x * std + mean
    return x.to(dtype)


def random_affine(c, dtype=torch.float64, seed=100):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return w, b


def set_affine(module, w, b):
    """Copy the same weight/bias values into a module (if it has them)."""
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(w)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(b)


def buffers_snapshot(module):
    """Clones of the running statistics (None stays None)."""
    out = {}
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        t = getattr(module, name, None)
        out[name] = None if t is None else t.detach().clone()
    return out


def assert_buffers_exactly(module, snap):
    """Running statistics bit-for-bit equal to a snapshot."""
    for name, before in snap.items():
        now = getattr(module, name, None)
        if before is None:
            assert now is None, f"{name} was None, now {now!r}"
        else:
            assert now is not None, f"{name} vanished"
            assert now.dtype == before.dtype, f"{name} dtype changed {before.dtype} -> {now.dtype}"
            assert torch.equal(now, before), f"{name} changed: {before} -> {now}"


def assert_same_buffers(ours, ref, dtype):
    """bnlib module buffers vs torch module buffers (values, dtypes, None-ness)."""
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a = getattr(ours, name, None)
        b = getattr(ref, name, None)
        if b is None:
            assert a is None, f"{name}: torch has None, bnlib has {a!r}"
            continue
        assert a is not None, f"{name}: torch has {b!r}, bnlib has None"
        assert a.dtype == b.dtype, f"{name} dtype {a.dtype} vs torch {b.dtype}"
        if name == "num_batches_tracked":
            assert torch.equal(a, b), f"num_batches_tracked {a} vs torch {b}"
        else:
            torch.testing.assert_close(a, b, **STAT_TOL[dtype], msg=lambda m: f"{name}: {m}")


def assert_close(a, b, tol, what=""):
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}" if what else m)


def message_mentions(msg: str, *numbers) -> bool:
    """True when every number appears in msg as a whole number (not part of a longer one)."""
    return all(re.search(rf"(?<!\d){n}(?!\d)", msg) for n in numbers)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def randomize_params(*modules, seed=100):
    """The same random values in the parameters of every module (gamma near 1)."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5 for p in modules[0].parameters()]
    with torch.no_grad():
        for module in modules:
            for p, v in zip(module.parameters(), values):
                p.copy_(v)


def forward_backward(module, x, dy_seed=1):
    """Output, input gradient and parameter gradients of one forward/backward,
    with a random upstream gradient ``dy`` drawn from ``dy_seed``."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(random_input(y.shape, dtype=y.dtype, seed=dy_seed, spread=False))
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def assert_same_run(ours, theirs, x, dtype, seed=1):
    """The same output (and dtype), input gradient and parameter gradients from
    one forward/backward of two modules, at the tolerances of ``dtype``."""
    y1, dx1, g1 = forward_backward(ours, x, seed)
    y2, dx2, g2 = forward_backward(theirs, x, seed)
    assert y1.dtype == y2.dtype
    assert_close(y1, y2, OUT_TOL[dtype], "output")
    assert_close(dx1, dx2, GRAD_TOL[dtype], "input gradient")
    assert g1.keys() == g2.keys()
    for name in g1:
        assert_close(g1[name], g2[name], GRAD_TOL[dtype], f"{name} gradient")


# --------------------------------------------------------------------------
# The project's scripts
# --------------------------------------------------------------------------
def load_tool(name: str):
    """``tools/<name>.py`` as a module, to call its functions in this process
    (a script, not a package's module; a fresh interpreter per call takes
    seconds)."""
    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
