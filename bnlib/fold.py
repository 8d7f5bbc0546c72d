r"""BN folding: merge an eval-mode BN layer into the linear or conv layer before it.

At inference a BN layer is a fixed affine map per output channel ``c``:

.. math::

    \mathrm{BN}(z)_c = \gamma_c \frac{z_c - \bar\mu_c}{\sqrt{\bar\sigma^2_c + \epsilon}} + \beta_c
                     = \tilde\gamma_c\, z_c + \tilde\beta_c,

    \tilde\gamma_c = \frac{\gamma_c}{\sqrt{\bar\sigma^2_c + \epsilon}}, \quad
    \tilde\beta_c = \beta_c - \tilde\gamma_c\, \bar\mu_c,

with ``running_mean`` :math:`\bar\mu` and ``running_var`` :math:`\bar\sigma^2`
(:func:`bn_scale_shift` returns :math:`\tilde\gamma` and :math:`\tilde\beta`
as ``scale, shift``).
When ``z = W x + b`` (a linear layer, or a convolution: ``W`` of shape
``(C_out, ...)``), the composition is again such a layer:

.. math::

    W'_{c,\cdot} = \tilde\gamma_c\, W_{c,\cdot}, \qquad
    b'_c = \tilde\gamma_c\, b_c + \tilde\beta_c = (b_c - \bar\mu_c)\, \tilde\gamma_c + \beta_c ,

so the pair is replaced by one layer with the same output (up to rounding):
one pass over the data fewer at inference (Jacob et al. 2018). The new
weights are computed in float64 and stored in the layer's dtype.

Only eval mode can be folded: in training mode BN uses the statistics of the
batch, which no fixed weights can reproduce.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from bnlib.frozen_batchnorm import FrozenBatchNorm, check_eval_map, freezable
from bnlib.functional import to_float64

__all__ = ["FOLDABLE", "bn_scale_shift", "fold_bn", "fold_model"]

#: The layer types a following BN can be folded into, each with its output
#: channels on axis 0 of its ``weight``.
FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weight_hook(layer) -> str | None:
    """``"weight_norm"`` or ``"spectral_norm"`` when ``layer``'s weight is
    recomputed before every call by torch's older hook-based versions
    (``torch.nn.utils.weight_norm`` / ``spectral_norm``), else None: a fold
    would write a weight the next call overwrites."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return "weight_norm"
        if isinstance(hook, SpectralNorm) and hook.name == "weight":
            return "spectral_norm"
    return None


def _foldable_norm(module) -> bool:
    """A BN layer (:func:`~bnlib.frozen_batchnorm.freezable`: batch renorm too, whose
    eval mode is BN's), or a :class:`~bnlib.frozen_batchnorm.FrozenBatchNorm`."""
    return freezable(module) or isinstance(module, FrozenBatchNorm)


def _check_bn(bn) -> None:
    if isinstance(bn, FrozenBatchNorm):
        return  # the same map in every mode
    check_eval_map(bn, "fold")
    if bn.training:
        raise ValueError(
            f"can only fold a BN layer in eval mode (call .eval() first), got {type(bn).__name__} in training mode"
        )


def bn_scale_shift(bn) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an eval-mode BN layer (or a frozen one, in either mode), float64, shape ``(C,)`` each:
    ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``,
    so that ``BN(z) = z * scale + shift`` per channel (``gamma = 1``, ``beta = 0``
    when the layer has no affine parameters). On the layer's device, or on
    the CPU for a layer on MPS, which has no float64."""
    _check_bn(bn)
    var = to_float64(bn.running_var)
    if not bool(torch.all(var + bn.eps > 0)):  # (NaN weights otherwise, silently)
        raise ValueError(f"bn_scale_shift expected running_var + eps > 0 in every channel, got a minimum of "
                         f"{float((var + bn.eps).min()):g} (a negative running_var, or eps <= 0)")
    if isinstance(bn, FrozenBatchNorm):
        return tuple(t.detach() for t in bn.scale_shift(torch.float64, var.device))
    mean = to_float64(bn.running_mean)
    gamma = torch.ones_like(var) if bn.weight is None else to_float64(bn.weight)
    beta = torch.zeros_like(var) if bn.bias is None else to_float64(bn.bias)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new layer equal to ``bn(layer(x))`` in eval mode: ``W' = W * scale``, ``b' = (b - running_mean) * scale + beta``.

    ``layer``: ``nn.Linear`` (weight ``(C, in)``) or ``nn.Conv1d/2d/3d`` (weight
    ``(C, in / groups, *kernel)``), with or without a bias; ``bn``: a BN layer
    with ``C`` channels in eval mode with running statistics, or a
    :class:`~bnlib.frozen_batchnorm.FrozenBatchNorm` with ``C`` channels. The result is a
    copy of ``layer`` (same type, shapes, stride, padding, dtype and device)
    that always has a bias; ``layer`` and ``bn`` are not changed.

    A ``Linear`` scales its last axis, and BN normalizes axis 1: the fold is
    right where the ``Linear``'s output reaches BN as ``(N, C)``. On a 3-D
    input (``Linear`` on ``(N, L, in)``, BN on ``(N, C, L)``) the two axes
    differ, and neither function can see the input to tell (torch's
    ``fuse_linear_bn_eval`` has the same limit).

    Raises ``ValueError`` for another layer type, a layer whose weight is
    reparametrized (weight or spectral norm, either torch version) or lazy
    and not yet initialized, a BN in training mode or without running
    statistics, or a channel count that does not match.
    """
    if not isinstance(layer, FOLDABLE):
        raise ValueError(
            f"expected the layer before BN to be one of {[t.__name__ for t in FOLDABLE]}, got {type(layer).__name__}"
        )
    if parametrize.is_parametrized(layer, "weight"):
        raise ValueError(
            f"expected a plain {type(layer).__name__}, got one whose weight is parametrized (weight or spectral "
            "norm): remove it first (torch.nn.utils.parametrize.remove_parametrizations)"
        )
    hook = _weight_hook(layer)
    if hook is not None:
        raise ValueError(
            f"expected a plain {type(layer).__name__}, got one with the older hook-based {hook}: "
            f"remove it first (torch.nn.utils.remove_{hook})"
        )
    if is_lazy(layer.weight):
        raise ValueError(
            f"expected an initialized {type(layer).__name__}, got a lazy one that has not seen an input yet "
            "(its weight has no shape): call it on a batch first"
        )
    _check_bn(bn)
    out_channels = layer.weight.shape[0]
    if bn.num_features != out_channels:
        raise ValueError(
            f"BN has {bn.num_features} channels (num_features) but {type(layer).__name__} has "
            f"{out_channels} output channels; they must match"
        )
    scale, shift = bn_scale_shift(bn)
    w = to_float64(layer.weight)  # (on the CPU for MPS, as the scale)
    b = torch.zeros(out_channels, dtype=torch.float64, device=w.device) if layer.bias is None else to_float64(layer.bias)
    new_w = w * scale.to(w.device).view((-1,) + (1,) * (w.dim() - 1))
    new_b = b * scale.to(w.device) + shift.to(w.device)

    folded = copy.deepcopy(layer)
    dtype, device = layer.weight.dtype, layer.weight.device
    # rounded where float64 is, then moved (MPS has no float64)
    folded.weight = nn.Parameter(new_w.to(dtype).to(device), requires_grad=layer.weight.requires_grad)
    folded.bias = nn.Parameter(new_b.to(dtype).to(device), requires_grad=layer.weight.requires_grad)
    return folded


def _fold_sequential(seq: nn.Sequential) -> tuple[nn.Sequential, int]:
    """Replace, in ``seq`` itself (a copy owned by the caller), every (foldable layer, BN)
    pair by the folded layer under the layer's name; the class of ``seq`` is kept."""
    items = list(seq._modules.items())
    kept, count, i = [], 0, 0
    while i < len(items):
        name, module = items[i]
        nxt = items[i + 1][1] if i + 1 < len(items) else None
        if isinstance(module, FOLDABLE) and nxt is not None and _foldable_norm(nxt):
            kept.append((name, fold_bn(module, nxt)))
            count += 1
            i += 2
            continue
        if module is not None:
            module, c = _fold_children(module)
            count += c
        kept.append((name, module))
        i += 1
    seq._modules.clear()
    for name, module in kept:
        seq.add_module(name, module)
    return seq, count


def _fold_children(module: nn.Module) -> tuple[nn.Module, int]:
    """Fold inside ``module`` (a copy owned by the caller); returns it and the number of folds."""
    if isinstance(module, nn.Sequential):
        return _fold_sequential(module)
    count = 0
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new_child, c = _fold_children(child)
        if new_child is not child:
            setattr(module, name, new_child)
        count += c
    return module, count


def fold_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every ``nn.Linear`` / ``nn.Conv*d`` directly followed
    by a BN layer (or a ``FrozenBatchNorm``) inside an ``nn.Sequential`` (at any depth) is replaced by one folded
    layer (:func:`fold_bn`); the BN layer is removed, the other layers and their
    names are kept. BN layers elsewhere (first in a Sequential, after an activation)
    stay as they are.

    The model must be in eval mode, every BN layer included: raises ``ValueError``
    otherwise, when a BN to fold has no running statistics, for a pair
    :func:`fold_bn` refuses, and for a layer anywhere under torch's older
    hook-based weight or spectral norm (which cannot be copied). ``model`` itself is
    never changed. For ``make_mlp(..., norm="bn")``: ``fc1, norm1, act1, ..., out``
    becomes ``fc1, act1, ..., out``. A ``Linear`` followed by BN folds rightly
    only where BN sees ``(N, C)`` inputs (see :func:`fold_bn`).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
    in_training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if in_training:
        raise ValueError(
            "fold_model needs the model in eval mode (call model.eval() first); "
            f"in training mode: {in_training[:5]}{' ...' if len(in_training) > 5 else ''}"
        )
    # (a layer under the hook-based weight or spectral norm cannot even be copied)
    hooked = next(((name or type(model).__name__, kind) for name, m in model.named_modules()
                   if (kind := _weight_hook(m)) is not None), None)
    if hooked is not None:
        name, kind = hooked
        raise ValueError(
            f"fold_model cannot copy a model with the older hook-based {kind} (on {name!r}): remove it first "
            f"(torch.nn.utils.remove_{kind}), or use torch.nn.utils.parametrizations.{kind}"
        )
    folded, _ = _fold_children(copy.deepcopy(model))
    return folded
