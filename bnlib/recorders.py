r"""Look inside a network: what each layer computes, how saturated it is, how it drifts.

Hooks on every activation module (``nn.Tanh``, ``nn.Sigmoid``, ``nn.ReLU``, ...)
record, for hidden layer ``l`` of a batch of ``N`` samples:

- ``z[l]``: the pre-activation ``z = W a + b``, the output of the linear
  layer that feeds the activation (the first ``nn.Linear`` before it), ``(N, C)``;
- ``act_in[l]``: what the activation function actually receives: ``z``
  without normalization, ``BN(z) = gamma * x_hat + beta`` with it, ``(N, C)``;
- ``a[l]``: the activation ``f(act_in)``, ``(N, C)``;
- ``grad_act_in[l]``: ``dL/d act_in``, after ``loss.backward()`` when asked for.

Saturation of a sigmoid or tanh unit is measured on ``act_in`` (see
:func:`saturation_fraction`); the drift of a layer's input distribution
between two moments of training (internal covariate shift) with
:func:`unit_stats` and :func:`gaussian_w2`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnlib.models import buffers_kept, modes_kept

__all__ = [
    "ACTIVATION_TYPES",
    "Recording",
    "record",
    "probe",
    "saturation_fraction",
    "weight_grad_norms",
    "init_grad_norms",
    "unit_stats",
    "gaussian_w2",
    "drift",
    "Snapshots",
]

#: Modules treated as activation functions by the hooks.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.Tanh,
    nn.Sigmoid,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
)


@dataclass
class Recording:
    """Per-layer tensors of one forward (and backward) pass; lists indexed by hidden layer."""

    names: list[str] = field(default_factory=list)
    z: list[torch.Tensor] = field(default_factory=list)
    act_in: list[torch.Tensor] = field(default_factory=list)
    a: list[torch.Tensor] = field(default_factory=list)
    grad_act_in: list[torch.Tensor | None] = field(default_factory=list)

    def saturation(self, activation: str = "tanh", threshold: float = 0.99) -> np.ndarray:
        """:func:`saturation_fraction` of ``act_in`` for every layer, shape ``(n_layers,)``."""
        return np.array([saturation_fraction(t, activation, threshold) for t in self.act_in])


def _activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES)]


def _linear_before(model: nn.Module) -> dict[str, str]:
    """For each activation module, the name of the last nn.Linear/Conv registered before it."""
    last, pairs = None, {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = name
        elif isinstance(module, ACTIVATION_TYPES):
            pairs[name] = last
    return pairs


@contextlib.contextmanager
def record(model: nn.Module, grads: bool = False) -> Iterator[Recording]:
    """Record ``z``, ``act_in``, ``a`` (and ``grad_act_in`` if ``grads``) of every activation module.

    Usage::

        with record(model, grads=True) as rec:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        rec.act_in[0].shape   # (N, width of layer 1)

    Tensors are detached copies; a module called twice records twice. The hooks
    are removed when the block ends, also on error.
    """
    rec = Recording()
    handles = []
    pairs = _linear_before(model)
    modules = dict(model.named_modules())
    pending_z: dict[str, torch.Tensor] = {}

    def z_hook(name):
        def hook(module, inputs, output):
            pending_z[name] = output.detach().clone()

        return hook

    # act_in (and its gradient hook) before the activation runs, a after it:
    # an in-place activation (ReLU(inplace=True)) overwrites its input.
    def act_pre_hook(name):
        def hook(module, inputs):
            x = inputs[0]
            i = len(rec.act_in)
            rec.names.append(name)
            # z: the output of the linear layer before this activation (if it ran)
            z = pending_z.pop(pairs[name], None) if pairs[name] is not None else None
            rec.z.append(z if z is not None else x.detach().clone())
            rec.act_in.append(x.detach().clone())
            rec.grad_act_in.append(None)
            if grads and x.requires_grad:

                def grad_hook(g, i=i):
                    rec.grad_act_in[i] = g.detach().clone()

                x.register_hook(grad_hook)

        return hook

    def act_hook(module, inputs, output):
        rec.a.append(output.detach().clone())

    try:
        for lin in {p for p in pairs.values() if p is not None}:
            handles.append(modules[lin].register_forward_hook(z_hook(lin)))
        for name, module in _activation_modules(model):
            handles.append(module.register_forward_pre_hook(act_pre_hook(name)))
            handles.append(module.register_forward_hook(act_hook))
        yield rec
    finally:
        for h in handles:
            h.remove()


def probe(model: nn.Module, x: torch.Tensor, train: bool | None = None) -> Recording:
    """One forward pass on ``x`` without gradients and without side effects.

    ``train``: run the model in training mode (BN uses the batch statistics of
    ``x``), eval mode, or ``None`` for its current mode. Every buffer (BN's
    running statistics, ``num_batches_tracked``) and the mode are restored
    afterwards, so probing does not change training.
    """
    with buffers_kept(model), modes_kept(model):
        if train is not None:
            model.train(train)
        with torch.no_grad(), record(model) as rec:
            model(x)
    return rec


def saturation_fraction(act_in: torch.Tensor, activation: str = "tanh", threshold: float = 0.99) -> float:
    r"""Fraction of entries of ``act_in`` (any shape) where the activation is saturated.

    A tanh unit is saturated when :math:`|\tanh(u)| > t` (``t = threshold``);
    a sigmoid unit when :math:`|2\sigma(u) - 1| > t`, i.e. its output is within
    ``(1 - t) / 2`` of 0 or 1. Both are the same condition on the derivative
    relative to its maximum, :math:`f'(u) / \max f' < 1 - t^2` (about 0.02
    for ``t = 0.99``), because :math:`2\sigma(u) - 1 = \tanh(u/2)`.
    """
    if activation not in ("tanh", "sigmoid"):
        raise ValueError(f"saturation is defined for 'tanh' and 'sigmoid', got {activation!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    u = torch.as_tensor(act_in, dtype=torch.float64)
    if u.numel() == 0:
        raise ValueError("act_in is empty")
    out = torch.tanh(u) if activation == "tanh" else 2 * torch.sigmoid(u) - 1
    return float((out.abs() > threshold).double().mean())


def weight_grad_norms(model: nn.Module) -> np.ndarray:
    r"""Frobenius norms :math:`\|\partial L / \partial W^{[l]}\|` of every ``nn.Linear`` weight, in order.

    Read after ``loss.backward()``; shape ``(n_linear_layers,)`` (the output
    layer is the last entry). A layer without a gradient gives NaN.
    """
    return np.array(
        [
            float(m.weight.grad.norm()) if m.weight.grad is not None else float("nan")
            for m in model.modules()
            if isinstance(m, nn.Linear)
        ]
    )


def init_grad_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    wrt: str = "weight",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> np.ndarray:
    r"""Per-layer gradient norms of ``loss_fn(model(x), y)`` at the current parameters, without an update.

    ``wrt="weight"``: :func:`weight_grad_norms`, :math:`\|\partial L/\partial W^{[l]}\|`
    for every ``nn.Linear`` (the output layer last), shape ``(n_linear_layers,)``.
    ``wrt="act_in"``: :math:`\|\partial L/\partial u^{[l]}\|` (Frobenius norm over
    the batch) of every activation's input ``u`` (``z``, or ``BN(z)`` with BN),
    the signal that backpropagation carries down, shape ``(n_hidden_layers,)``.

    Gradients are zeroed first and left in ``.grad``; BN running statistics are
    restored, so the model is exactly as before apart from ``.grad``.
    """
    if wrt not in ("weight", "act_in"):
        raise ValueError(f"wrt must be 'weight' or 'act_in', got {wrt!r}")
    model.zero_grad(set_to_none=True)
    with buffers_kept(model), record(model, grads=True) as rec:
        loss_fn(model(x), y).backward()
    if wrt == "weight":
        return weight_grad_norms(model)
    return np.array([float(g.norm()) if g is not None else float("nan") for g in rec.grad_act_in])


def unit_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-unit ``(mu, std)`` over every axis except 1: shapes ``(C,)`` for ``x`` of ``(N, C, ...)``.

    ``std`` is the biased one, :math:`\sqrt{\frac1m \sum_i (x_i - \mu)^2}`,
    computed in float64 with two passes.
    """
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"expected (N, C, ...) with at least 2 dims, got shape {tuple(x.shape)}")
    dims = (0,) + tuple(range(2, x.ndim))
    x = x.detach().to(torch.float64)
    mu = x.mean(dim=dims)
    std = x.var(dim=dims, unbiased=False).sqrt()
    return mu, std


def gaussian_w2(
    mu_a: torch.Tensor, std_a: torch.Tensor, mu_b: torch.Tensor, std_b: torch.Tensor
) -> torch.Tensor:
    r"""2-Wasserstein distance between 1-D normals, elementwise.

    .. math:: W_2\bigl(\mathcal N(\mu_a, s_a^2), \mathcal N(\mu_b, s_b^2)\bigr)
              = \sqrt{(\mu_a - \mu_b)^2 + (s_a - s_b)^2}

    It is how far the distribution of a unit moved, in the unit's own units:
    a shift of the mean by 0.3 or a change of the std by 0.3 both give 0.3.
    """
    return torch.sqrt((mu_a - mu_b) ** 2 + (std_a - std_b) ** 2)


def drift(x_a: torch.Tensor, x_b: torch.Tensor, relative: bool = False) -> float:
    r"""How far a layer's distribution moved from ``x_a`` to ``x_b``: the mean over units of :func:`gaussian_w2`.

    ``x_a``, ``x_b``: the same layer's values at two moments, shapes ``(N, C, ...)``
    (``N`` may differ) with the same ``C``. With ``relative=True`` the result is
    divided by the mean per-unit std of ``x_a``, so layers of different scale
    compare: :math:`\overline{W_2} / \overline{\mathrm{std}_a}`. Returns a float
    (0 when nothing moved).
    """
    if x_a.ndim < 2 or x_b.ndim < 2 or x_a.shape[1] != x_b.shape[1]:
        raise ValueError(
            f"need (N, C, ...) inputs with the same C, got shapes {tuple(x_a.shape)} and {tuple(x_b.shape)}"
        )
    mu_a, std_a = unit_stats(x_a)
    w2 = gaussian_w2(mu_a, std_a, *unit_stats(x_b)).mean()
    if relative:
        w2 = w2 / std_a.mean()
    return float(w2)


class Snapshots:
    """A training callback that probes the model on a fixed batch every ``every`` steps.

    ``Snapshots(x_probe, every=10)`` called as ``snap(step, model)`` stores
    ``snap.steps`` (list of ints) and ``snap.recordings`` (one :class:`Recording`
    per snapshot, from :func:`probe` in training mode, so BN normalizes with the
    statistics of ``x_probe`` and the running statistics are untouched).
    """

    def __init__(self, x_probe: torch.Tensor, every: int = 1, train: bool | None = True):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.x_probe = x_probe
        self.every = every
        self.train = train
        self.steps: list[int] = []
        self.recordings: list[Recording] = []

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every == 0:
            self.steps.append(step)
            self.recordings.append(probe(model, self.x_probe, train=self.train))

    def drift(self, what: str = "act_in", reference: str = "previous", relative: bool = False) -> np.ndarray:
        """:func:`drift` of every layer between snapshots, shape ``(n_snapshots - 1, n_layers)``.

        ``what``: ``"z"``, ``"act_in"`` or ``"a"``. ``reference``: ``"previous"``
        (snapshot ``k`` vs ``k - 1``) or ``"first"`` (snapshot ``k`` vs the first).
        ``relative``: divide by the reference's mean std (see :func:`drift`).
        """
        if what not in ("z", "act_in", "a"):
            raise ValueError(f"what must be 'z', 'act_in' or 'a', got {what!r}")
        if reference not in ("previous", "first"):
            raise ValueError(f"reference must be 'previous' or 'first', got {reference!r}")
        if len(self.recordings) < 2:
            raise ValueError(f"need at least 2 snapshots, have {len(self.recordings)}")
        layers = [getattr(r, what) for r in self.recordings]
        out = []
        for k in range(1, len(layers)):
            ref = layers[k - 1] if reference == "previous" else layers[0]
            out.append([drift(ref[l], layers[k][l], relative) for l in range(len(ref))])
        return np.array(out)
