r"""Frozen BN: a batch norm layer whose statistics and affine parameters are fixed.

Fine-tuning a pretrained network on small batches (an object detector with two
images per device, say) often *freezes* its BN layers: every one of them
normalizes with the running statistics learned in pretraining, in training
mode as in eval mode, and :math:`\gamma`, :math:`\beta` stay as they are. What
is left is the eval-mode map of BN, a fixed affine map per channel ``c``
(the same :math:`\tilde\gamma`, :math:`\tilde\beta` as in :mod:`bnlib.fold`):

.. math::

    y_c = \gamma_c \frac{x_c - \bar\mu_c}{\sqrt{\bar\sigma^2_c + \epsilon}} + \beta_c
        = \tilde\gamma_c\, x_c + \tilde\beta_c, \qquad
    \tilde\gamma_c = \frac{\gamma_c}{\sqrt{\bar\sigma^2_c + \epsilon}}, \quad
    \tilde\beta_c = \beta_c - \tilde\gamma_c\, \bar\mu_c .

Why a module and not ``bn.eval()``: training loops call ``model.train()``,
which puts every submodule, an eval-mode BN included, back into training mode.
:class:`FrozenBatchNorm` has no training mode to go back to.

It is torchvision's ``FrozenBatchNorm2d`` (``torchvision.ops``) for any input
``(N, C, *)`` of 2 to 5 dims: the same four buffers (``weight``, ``bias``,
``running_mean``, ``running_var``) and no parameters, so state dicts load in
either direction. From a BN layer's state dict ``num_batches_tracked`` is
dropped, as there; a BN layer built with ``affine=False`` (or ``bias=False``)
has no ``weight`` (``bias``) to load, so freeze such a layer with
:meth:`FrozenBatchNorm.from_batch_norm` instead. ``eps`` is not part of a
state dict (nor is it in torch's BN): give it to the constructor.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlib._checks import check_floating_dtype, check_input_dims, check_norm_args, check_num_channels
from bnlib.alternatives import _BatchRenorm
from bnlib.batchnorm import NotScriptable
from bnlib.functional import _eps_in, check_tensor_input
from bnlib.moving_average import is_batchnorm

__all__ = ["FrozenBatchNorm", "freezable", "check_eval_map"]


class FrozenBatchNorm(NotScriptable, nn.Module):
    r"""``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel, in every mode.

    ``num_features``: the channel count ``C`` (axis 1). The four buffers start
    as an identity map (``weight`` 1, ``bias`` 0, ``running_mean`` 0,
    ``running_var`` 1); :meth:`convert_frozen_batchnorm` copies them from
    trained BN layers. The map is computed in float32 for float16 and
    bfloat16 input (in float64 for float64 input); the output has the input's
    dtype. Gradients flow to the input only. Built on the meta device and
    moved with ``to_empty``, its buffers hold whatever memory they got:
    :meth:`reset_parameters` makes it the identity map again (or load a
    state dict).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None):
        check_norm_args(num_features, eps, None)
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def reset_parameters(self) -> None:
        """The identity map: ``weight`` 1, ``bias`` 0, ``running_mean`` 0, ``running_var`` 1."""
        with torch.no_grad():
            self.weight.fill_(1)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1)

    def scale_shift(self, dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(scale, shift)``, :math:`\tilde\gamma` and :math:`\tilde\beta`, shape ``(C,)``, in ``dtype``,
        on ``device`` (default: the layer's)."""
        tensors = (self.weight, self.bias, self.running_mean, self.running_var)
        if device is not None:  # (moved first, then converted: MPS has no float64)
            tensors = [t.to(device) for t in tensors]
        weight, bias, mean, var = (t.to(dtype) for t in tensors)
        scale = weight * torch.rsqrt(var + _eps_in(self.eps, dtype))
        return scale, bias - mean * scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_tensor_input(name, input)
        check_input_dims(name, input.shape, (2, 3, 4, 5))
        check_num_channels(name, input.shape, self.num_features)
        check_floating_dtype(name, input.dtype, input.is_floating_point())
        # float16 and bfloat16 hold too few digits for 1 / sqrt(var + eps)
        compute = torch.promote_types(input.dtype, torch.float32)
        scale, shift = self.scale_shift(compute)
        per_channel = (1, -1) + (1,) * (input.dim() - 2)
        out = input.to(compute) * scale.view(per_channel) + shift.view(per_channel)
        return out.to(input.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A BN layer's state dict has a step counter that a frozen layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> "FrozenBatchNorm":
        """A frozen copy of one BN layer (see :func:`freezable`), in either mode: its running
        statistics, ``weight`` and ``bias`` (1 and 0 without them), ``eps``, device, dtype
        and training flag (which changes nothing in a frozen layer). The copy does
        not share memory with ``bn``."""
        _check_freezable(bn)
        like = bn.running_mean
        frozen = cls(bn.num_features, bn.eps, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        frozen.train(bn.training)
        return frozen

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every BN layer in ``module`` by a :class:`FrozenBatchNorm`; return the module.

        Converted: every layer :func:`freezable` accepts. The module is changed
        in place, as by ``SyncBatchNorm.convert_sync_batchnorm``; when it is
        itself a BN layer the frozen copy is returned. A BN layer that appears
        at several places (shared) becomes one frozen layer, shared the same
        way. Every layer is checked before any is replaced: a layer without
        running statistics (``track_running_stats=False``), a lazy layer that
        has not seen its first input, or one whose eval mode is more than
        ``gamma * x_hat + beta`` raises ``ValueError`` and leaves ``module`` as it was.
        """
        for m in module.modules():
            if freezable(m):
                _check_freezable(m)
        return _convert(cls, module, {})


def freezable(module: nn.Module) -> bool:
    """True for the layers :class:`FrozenBatchNorm` replaces: what
    :func:`bnlib.moving_average.is_batchnorm` calls a BN layer (``torch.nn.BatchNorm*d``
    and ``SyncBatchNorm``, bnlib's ``BatchNorm*d``, ``SyncBatchNorm`` and
    ``GhostBatchNorm``), and bnlib's ``BatchRenorm1d/2d``, whose eval mode is BN's."""
    return is_batchnorm(module) or isinstance(module, _BatchRenorm)


def check_eval_map(bn, action: str = "freeze") -> None:
    """Raise ``ValueError`` unless ``bn``'s eval mode is the fixed per-channel map
    ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta``, which can be
    frozen (this module) or folded (:mod:`bnlib.fold`): ``bn`` must be a layer
    :func:`freezable` accepts, one that has seen its first input if it is lazy,
    no more than that map in eval mode, and with running statistics.
    ``action``: ``"freeze"`` or ``"fold"``, for the message."""
    done = {"freeze": "frozen", "fold": "folded"}[action]
    if not freezable(bn):
        raise ValueError(f"expected a batch norm layer (torch's or bnlib's BatchNorm*d), got {type(bn).__name__}")
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(f"{type(bn).__name__} has not seen an input yet, so it has no statistics to be {done}: "
                         "run one forward pass first")
    if not getattr(bn, "foldable", True):
        raise ValueError(f"{type(bn).__name__} computes more than gamma * x_hat + beta in eval mode: "
                         f"it cannot be {done}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"can only {action} a BN layer with running statistics, got {type(bn).__name__} "
                         "with track_running_stats=False (it normalizes with batch statistics even in eval mode)")


def _check_freezable(bn) -> None:
    check_eval_map(bn, "freeze")


def _convert(cls, module: nn.Module, done: dict) -> nn.Module:
    if freezable(module):
        if id(module) not in done:
            done[id(module)] = cls.from_batch_norm(module)
        return done[id(module)]
    # _modules, not named_children(), which yields a shared child only once
    for name, child in list(module._modules.items()):
        if child is not None:
            module.add_module(name, _convert(cls, child, done))
    return module
