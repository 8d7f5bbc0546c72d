r"""Conditional normalization: a condition enters a network through gamma and beta.

After batch norm has standardized a unit, ``gamma`` and ``beta`` decide its
scale and offset. Conditional batch norm (de Vries et al. 2017) makes them
functions of a condition, there a question's embedding, through a small
network. For a class label the simplest such function is a table with a row
per class, shape ``(K, C)``: each sample is scaled and shifted with the
row of its label ``k_i``,

.. math::

    \hat{x}_i = \frac{x_i - \mu}{\sqrt{\mathrm{var} + \epsilon}}, \qquad
    y_i = \gamma_{k_i} \hat{x}_i + \beta_{k_i},

the form of conditional instance norm (Dumoulin et al. 2017, a row per
painting style) and of the class-conditional BN in GAN generators (Miyato
and Koyama 2018). The statistics ``mu`` and ``var`` are plain batch norm's,
over the whole batch with every class in it, and so are the running
estimates; only the affine step depends on the class. FiLM (Perez et al.
2018) computes the pair from any vector with a linear layer.

Adaptive instance norm (AdaIN; Huang and Belongie 2017) takes the pair from
another input: each channel of the content is instance-normalized, then
given the mean and standard deviation that the same channel has in the
style input:

.. math::

    \mathrm{AdaIN}(x, s) = \sigma(s)\, \frac{x - \mu(x)}{\sigma(x)} + \mu(s),

statistics per sample and channel over the spatial axes,
``sigma = sqrt(var + eps)`` with the biased variance.

The NumPy reference of conditional batch norm, with its backward written
out, is :func:`bnlib.reference.conditional_batchnorm_forward`.
"""

import math
import numbers

import torch
from torch import nn

from bnlib import batchnorm as bnn
from bnlib._checks import (
    InputError,
    check_floating_dtype,
    check_input_dims,
    check_labels,
    check_num_channels,
    check_positive_finite,
)
from bnlib.alternatives import instance_norm
from bnlib.functional import check_tensor_input

__all__ = ["ConditionalBatchNorm1d", "ConditionalBatchNorm2d", "ConditionalBatchNorm3d", "adaptive_instance_norm"]


class _ConditionalBatchNorm(bnn.NotScriptable, nn.Module):
    """Batch norm without an affine step (``norm``), then one ``gamma`` and ``beta`` per class.

    Args: ``(num_features, num_classes, eps=1e-5, momentum=0.1,
    track_running_stats=True, device=None, dtype=None)``; ``weight`` (gamma)
    and ``bias`` (beta) are parameters of shape ``(num_classes,
    num_features)``, initialized to 1 and 0 as in BatchNorm, so that at the
    start every class gets the plain standardized input. The running
    estimates live in ``norm``, a :class:`bnlib.nn.BatchNorm1d/2d/3d` with
    ``affine=False``: the conversions that swap BN layers
    (``convert_sync_batchnorm``, bnlib's or torch's, and
    ``FrozenBatchNorm.convert_frozen_batchnorm``) reach it and leave the
    class tables alone, and ``bnlib.training.train(decay_bn=False)``
    exempts the tables from weight decay as BN's gamma and beta.

    ``forward(input, labels)``: ``labels`` holds one integer class in
    ``[0, num_classes)`` per sample (shape ``(N,)``). Checking their range
    reads two numbers back from the device, one host sync per call: a clear
    error is worth it here. Bad input raises ``InputError`` (a
    ``ValueError``) before the running estimates change. Under
    ``torch.compile`` and ``torch.export``, which cannot read values back,
    an op of the graph asserts the range instead (a ``RuntimeError``).
    """

    norm_class = None  # the BatchNorm*d that normalizes: it says which input dims are taken

    def __init__(self, num_features, num_classes, eps=1e-5, momentum=0.1, track_running_stats=True,
                 device=None, dtype=None):
        # NumPy integers too, as for num_features
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        super().__init__()
        self.num_classes = int(num_classes)
        self.norm = self.norm_class(num_features, eps, momentum, affine=False,
                                    track_running_stats=track_running_stats, device=device, dtype=dtype)
        bnn.register_affine_parameters(self, (num_classes, num_features), True, True,
                                       {"device": device, "dtype": dtype})
        bnn.reset_affine_parameters(self)

    @property
    def num_features(self):
        return self.norm.num_features

    def reset_running_stats(self):
        self.norm.reset_running_stats()

    def reset_parameters(self):
        """Running estimates reset, every class's gamma 1 and beta 0."""
        self.reset_running_stats()
        bnn.reset_affine_parameters(self)

    def extra_repr(self):
        return f"{self.num_features}, num_classes={self.num_classes}"

    def forward(self, input, labels):
        # Every check before the running estimates change: the input's here
        # (norm may have been swapped for a frozen or synchronized layer),
        # the batch size in norm, before it counts the batch.
        name = type(self).__name__
        check_tensor_input(name, input)
        check_input_dims(name, input.shape, self.norm_class.allowed_dims)
        check_num_channels(name, input.shape, self.num_features)
        check_floating_dtype(name, input.dtype, input.is_floating_point())
        if not isinstance(labels, torch.Tensor):
            raise InputError(f"{name} expected the labels as a tensor, got {type(labels).__name__}")
        integer = not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool
        seen = integer and labels.numel() > 0
        traced = torch.compiler.is_compiling()  # torch.compile or torch.export: no host reads
        lowest, highest = (labels.min().item(), labels.max().item()) if seen and not traced else (None, None)
        check_labels(name, labels.shape, integer, input.shape[0], lowest, highest, self.num_classes)
        if seen and traced:  # the range, checked by an op of the graph (before any buffer is written back)
            torch._assert_async(((labels >= 0) & (labels < self.num_classes)).all(),
                                f"{name} expected labels in [0, {self.num_classes})")
        x_hat = self.norm(input)
        per_sample = (input.shape[0], self.num_features) + (1,) * (input.dim() - 2)
        labels = labels.to(self.weight.device, torch.long)  # uint8 would index as a mask
        gamma = self.weight[labels].view(per_sample).to(x_hat.dtype)
        beta = self.bias[labels].view(per_sample).to(x_hat.dtype)
        return torch.addcmul(beta, gamma, x_hat)


class ConditionalBatchNorm1d(_ConditionalBatchNorm):
    """Conditional batch norm for ``(N, C)`` or ``(N, C, L)`` inputs."""

    norm_class = bnn.BatchNorm1d


class ConditionalBatchNorm2d(_ConditionalBatchNorm):
    """Conditional batch norm for ``(N, C, H, W)`` inputs: statistics over (N, H, W)."""

    norm_class = bnn.BatchNorm2d


class ConditionalBatchNorm3d(_ConditionalBatchNorm):
    """Conditional batch norm for ``(N, C, D, H, W)`` inputs: statistics over (N, D, H, W)."""

    norm_class = bnn.BatchNorm3d


def adaptive_instance_norm(content, style, eps=1e-5):
    r"""AdaIN (Huang and Belongie 2017): the content's channels with the style's mean and spread.

    ``sigma(style) * (content - mu(content)) / sigma(content) + mu(style)``,
    with ``mu`` and ``sigma = sqrt(var + eps)`` (biased variance) per sample
    and channel, over the spatial axes. The content's part is
    :func:`bnlib.alternatives.instance_norm`, backward by hand; the style's
    statistics take autograd's.

    Args:
        content: ``(N, C, *spatial)``, at least one spatial axis with more than one value.
        style: ``(N, C, *spatial')`` or ``(1, C, *spatial')``, one style for every
            sample; its spatial size may differ from the content's.

    Implementations differ in dividing by ``m`` or ``m - 1`` and in where
    ``eps`` goes; on large feature maps they agree closely. float16 and
    bfloat16 style statistics are computed in float32; the output has the
    content's dtype.
    """
    check_positive_finite("eps", eps)
    if content.dim() < 3 or style.dim() != content.dim():
        raise InputError("adaptive_instance_norm expected content and style with the same number of "
                         f"dimensions, at least 3 (N, C, L, ...), got {content.dim()}D and {style.dim()}D")
    if style.shape[1] != content.shape[1] or style.shape[0] not in (1, content.shape[0]):
        raise InputError(f"adaptive_instance_norm expected a style of shape (N, C, ...) or (1, C, ...) with "
                         f"N = {content.shape[0]}, C = {content.shape[1]} (the content's), "
                         f"got {tuple(style.shape)}")
    spatial = tuple(range(2, style.dim()))
    if math.prod(style.shape[2:]) < 2:
        raise InputError(f"adaptive_instance_norm expected more than 1 spatial value in the style, "
                         f"got {tuple(style.shape)}")
    # float32 at least: a style's spread of a few hundred squared overflows float16
    compute = torch.promote_types(torch.promote_types(content.dtype, style.dtype), torch.float32)
    style = style.to(compute)
    style_mu = style.mean(dim=spatial, keepdim=True)
    style_sigma = ((style - style_mu).square().mean(dim=spatial, keepdim=True) + eps).sqrt()
    return torch.addcmul(style_mu, style_sigma, instance_norm(content, eps=eps).to(compute)).to(content.dtype)
