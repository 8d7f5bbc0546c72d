r"""Test-time adaptation through BN's parameters: TENT (Wang et al. 2021).

A network trained on one distribution meets another at test time, with no
labels. AdaBN (``bnlib.moving_average.precise_bn`` on the new inputs)
re-estimates BN's statistics; TENT goes one step further. It normalizes
every batch with its own statistics and also moves BN's affine parameters
:math:`\gamma` and :math:`\beta` (and nothing else) by gradient descent on
the mean entropy of the model's predictions on that batch,

.. math::

    H(B) = -\frac{1}{m} \sum_{i \in B} \sum_{k=1}^{K} p_{ik} \log p_{ik},
    \qquad p_i = \operatorname{softmax}(f(x_i)),

so that the predictions grow more confident. The prediction for a batch is
made by the same forward pass that gives the gradient (before the update),
online, as in the paper.

Use: ``params = configure_tent(model)``, an optimizer on ``params`` (the
paper: Adam at 1e-3, or SGD with momentum), then ``tent_step(model, x,
optimizer)`` for every test batch ``x`` (or ``tent_pass`` over a set of
inputs in random batches). ``configure_tent`` changes
``model`` in place: copy it first (``copy.deepcopy``) to keep the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnlib.batchnorm import check_initialized
from bnlib.functional import _compute_dtype
from bnlib.moving_average import is_batchnorm
from bnlib.training import check_minibatch_size, minibatches

__all__ = ["prediction_entropy", "configure_tent", "tent_step", "tent_pass"]


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""The mean entropy of the softmax predictions, in nats: :math:`H(B)` above.

    ``logits``: a floating-point tensor of shape ``(N, K)``, one row of ``K``
    class scores per sample. Returns a scalar tensor, between 0 (every
    prediction certain) and :math:`\log K` (every prediction uniform),
    computed from ``log_softmax`` (large logits do not overflow; a logit of
    ``-inf``, a masked class, counts as probability 0), in float32
    for float16 and bfloat16 logits, and returned in their dtype. Raises
    ``ValueError`` for a tensor that is not 2-dimensional, has no rows or no
    classes, or is not floating point.
    """
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"expected logits of shape (N, K) with N, K >= 1, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"expected floating-point logits, got {logits.dtype}")
    log_p = F.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=1)
    p = log_p.exp()
    # p log p -> 0 as p -> 0: a masked class (logit -inf, log p = -inf) adds 0,
    # not 0 * -inf = NaN, and passes no NaN back through the gradient either.
    return -(p * log_p.masked_fill(p == 0, 0.0)).sum(dim=1).mean().to(logits.dtype)


def configure_tent(model: nn.Module) -> list[nn.Parameter]:
    r"""Set ``model`` up for TENT, in place, and return the parameters to adapt.

    Afterwards every BN layer (``moving_average.is_batchnorm``: torch's and
    bnlib's BatchNorm*d, SyncBatchNorm and GhostBatchNorm) normalizes with
    the statistics of the batch in front of it, in training and in eval mode
    alike (``track_running_stats=False``, running estimates None, as in the
    authors' code); the model is in training mode (so dropout, if any, is
    active, as in the authors' code); and only the BN layers' ``weight``
    (:math:`\gamma`) and ``bias`` (:math:`\beta`), where they exist, require
    gradients. Returns those, layer by layer in ``model.modules()`` order,
    weight before bias, each once (a parameter shared by two layers is not
    repeated). A ``GhostBatchNorm`` normalizes each of its virtual batches
    by itself; a ``SyncBatchNorm`` in a process group takes the statistics
    of the whole batch across processes. Other normalization layers
    (``FrozenBatchNorm``, layer or group norm) are left as they are; so is
    batch renorm, which in the model's training mode then keeps correcting
    towards, and updating, its running statistics (call its ``eval()`` if
    that is not wanted).

    Raises ``ValueError``, and changes nothing, when no BN layer has a
    weight or a bias (nothing to adapt), or when a lazy BN layer has not seen
    an input yet.
    """
    layers = [m for m in model.modules() if is_batchnorm(m)]
    params = {}
    for m in layers:
        for p in (m.weight, m.bias):
            if p is not None:
                params.setdefault(id(p), p)
    check_initialized(layers, "configure_tent")
    if not params:
        raise ValueError(
            "expected a model with at least one batch norm layer with a weight or a bias "
            f"(affine=True), got {len(layers)} batch norm layer(s) and none with either"
        )
    model.train()
    model.requires_grad_(False)
    for m in layers:
        # batch statistics always: with no running estimates, eval mode uses the batch too
        m.track_running_stats = False
        m.running_mean = None
        m.running_var = None
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())


def tent_step(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One TENT step on the batch ``x``: predict, then descend the entropy.

    Runs ``model(x)`` once, takes :func:`prediction_entropy` of the output,
    and lets ``optimizer`` take one step on its gradient (the gradients are
    zeroed first). Gradients are enabled for the step even inside
    ``torch.no_grad()``, as in an evaluation loop. Returns the logits of that
    forward pass, detached: the predictions for ``x`` made before ``x``
    changed the parameters. The model must have been set up by
    :func:`configure_tent`, and ``optimizer`` hold (some of) the parameters
    it returned.
    """
    with torch.enable_grad():
        logits = model(x)
        loss = prediction_entropy(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    optimizer.step()
    return logits.detach()


def tent_pass(
    model: nn.Module,
    x: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    drop_last: bool = False,
) -> torch.Tensor:
    """One pass of TENT over the inputs ``x``: a :func:`tent_step` per batch.

    The batches are a random permutation of ``x``'s rows cut into
    ``batch_size`` rows each (``bnlib.training.minibatches`` with
    ``generator``; ``drop_last`` leaves out a last, smaller batch). Returns
    the online logits, in ``x``'s row order: each row as predicted by the
    step of its batch, before that step. Rows left out by ``drop_last`` are
    NaN. A last batch of one ``(1, C)`` row, which BN in training mode
    refuses, raises ``ValueError`` before the first step, not after the
    others changed the model.
    """
    # (checked before the generator is drawn from)
    n = len(x)
    check_minibatch_size(n, batch_size)
    if x.dim() == 2 and not drop_last and n % batch_size == 1 and n > 1:
        raise ValueError(f"tent_pass would end with a batch of one row ({len(x)} rows in batches of "
                         f"{batch_size}), which BN cannot normalize: use drop_last=True or another batch_size")
    logits = None
    for idx in minibatches(n, batch_size, generator, drop_last=drop_last):
        batch_logits = tent_step(model, x[idx], optimizer)
        if logits is None:
            logits = batch_logits.new_full((len(x),) + tuple(batch_logits.shape[1:]), float("nan"))
        logits[idx] = batch_logits
    return logits
