r"""A small, deterministic training loop for classifiers.

One step on a mini-batch ``B`` of size ``m`` minimizes the mean
cross-entropy

.. math::

    L = -\frac{1}{m} \sum_{i \in B} \log \operatorname{softmax}(f(x_i))_{y_i},

with plain SGD (``w <- w - lr * (g + weight_decay * w)``, optionally with
momentum) or Adam. Mini-batches are drawn without replacement from a fresh
permutation every epoch, from a ``torch.Generator`` seeded with ``seed``, so
the same call gives the same numbers every time (with one thread). Dropout
and other random layers draw from torch's global generator instead: seed
it too (``torch.manual_seed``) for a model that has them.

:func:`per_sample_gradients` splits the gradient of that loss into one
gradient per sample, ``g_i``, taken in the graph of the whole batch, so that
for a batch of ``N`` samples (the ``m`` above) ``sum_i g_i = N * dL/dtheta``:
what differentially private SGD clips one by one (chapter "Alternatives to
BN").

:func:`adaptive_grad_clip_` is the adaptive gradient clipping of
normalizer-free networks (Brock et al. 2021): every unit's gradient
``G_i`` is scaled down, where it is large next to that unit's weights
``W_i``, to

.. math::

    G_i \leftarrow \lambda \, \frac{\max(\lVert W_i \rVert, \epsilon)}{\lVert G_i \rVert} \, G_i
    \quad \text{where} \quad
    \frac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda ;

:func:`train` applies it (or any other change to the gradients) through
``clip_gradients``, between the backward pass and the update.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bnlib._checks import check_integer_at_least, check_positive_finite
from bnlib.functional import _compute_dtype
from bnlib.models import buffers_kept, modes_kept

__all__ = ["History", "check_minibatch_size", "minibatches", "accuracy", "evaluate", "train", "per_sample_gradients",
           "unitwise_norm", "adaptive_grad_clip_"]


@dataclass
class History:
    """One entry per update step: the step number (1, 2, ...), the batch loss and batch accuracy."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def check_minibatch_size(n: int, batch_size) -> None:
    """ValueError unless ``batch_size`` is an integer in ``[1, n]`` (not a bool)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an integer in [1, n={n}], got {batch_size!r}")


def minibatches(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """Index tensors of one epoch: a random permutation of ``range(n)`` cut into batches.

    With ``drop_last`` the last, smaller batch is skipped (BN needs more than
    one sample, and equal batch sizes keep the statistics comparable).
    """
    check_minibatch_size(n, batch_size)
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of ``logits`` (``(N, K)``) whose argmax equals ``y`` (``(N,)``)."""
    if logits.dim() != 2 or tuple(y.shape) != (logits.shape[0],):
        # (a (N, 1) or (1,) y would broadcast into an N x N comparison)
        raise ValueError(f"accuracy expected logits of shape (N, K) and labels of shape (N,), "
                         f"got {tuple(logits.shape)} and {tuple(y.shape)}")
    return float((logits.argmax(dim=1) == y).double().mean())


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on ``(x, y)`` in eval mode, without gradients.

    The mode of the model and of each of its submodules is restored afterwards.
    """
    with modes_kept(model), torch.no_grad():
        model.eval()
        logits = model(x)
        return float(F.cross_entropy(logits, y)), accuracy(logits, y)


def _exempt_parameters(model, exempt_from_decay):
    """The parameters of the submodules named in ``exempt_from_decay`` (their
    submodules' included), by ``id``; ValueError for a bare string or a name that
    ``model.named_modules()`` does not have."""
    if isinstance(exempt_from_decay, (str, bytes)):
        # a bare string would be taken letter by letter
        raise ValueError(f"exempt_from_decay must be a collection of module names, e.g. ('norm4',), "
                         f"got the string {exempt_from_decay!r}")
    try:
        names = list(exempt_from_decay)
    except TypeError:
        raise ValueError(f"exempt_from_decay must be a collection of module names, "
                         f"got {exempt_from_decay!r}") from None
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"exempt_from_decay names modules the model does not have: {unknown}; "
                         f"its modules are {[n for n in modules if n]}")
    return {id(p) for n in names for p in modules[n].parameters()}


def _parameter_groups(model, weight_decay, decay_bn, exempt_from_decay=()):
    """One group with ``weight_decay``; without ``decay_bn``, the BN layers' gamma and beta
    (conditional BN's tables and batch renorm's too) in a second group with none, and
    with them the parameters of the modules named in ``exempt_from_decay``."""
    exempt = _exempt_parameters(model, exempt_from_decay)
    if (decay_bn and not exempt) or weight_decay == 0:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    if not decay_bn:
        from bnlib.alternatives import _BatchRenorm
        from bnlib.conditional import _ConditionalBatchNorm
        from bnlib.moving_average import is_batchnorm

        # a conditional BN's class tables are its gamma and beta, one row per class
        exempt |= {id(p) for m in model.modules()
                   if is_batchnorm(m) or isinstance(m, (_ConditionalBatchNorm, _BatchRenorm))
                   for p in m.parameters(recurse=False)}
    return [{"params": [p for p in model.parameters() if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) in exempt], "weight_decay": 0.0}]


def _optimizer(model, optimizer, lr, momentum, weight_decay, decay_bn=True, exempt_from_decay=()):
    groups = _parameter_groups(model, weight_decay, decay_bn, exempt_from_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")



def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float = 0.1,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    decay_bn: bool = True,
    exempt_from_decay: Iterable[str] = (),
    seed: int = 0,
    callback: Callable[[int, nn.Module], None] | None = None,
    clip_gradients: Callable[[nn.Module], object] | None = None,
) -> History:
    """Train ``model`` on ``x`` (``(N, d)``) and labels ``y`` (``(N,)``) in training mode.

    Give exactly one of ``steps`` (number of updates) or ``epochs`` (passes
    over the data, each of ``N // batch_size`` full batches: the last
    ``N % batch_size`` rows of each shuffled pass are left out).
    ``batch_size=None`` means full-batch gradient descent.
    ``callback(step, model)`` is called with ``step=0`` before the first update
    and with ``step=t`` after update ``t``, so it sees the initial and every
    later state. ``decay_bn=False`` exempts the BN layers' ``gamma`` and
    ``beta`` from ``weight_decay`` (the other parameters keep it).
    ``exempt_from_decay`` names submodules (as ``model.named_modules()``
    does, e.g. ``("norm4",)``) whose parameters, their submodules' included,
    get no weight decay either: one BN layer's ``gamma`` and ``beta`` alone,
    say.
    ``clip_gradients(model)`` is called after every backward pass, before
    the update, to change the ``.grad`` of the parameters in place (for
    example with :func:`adaptive_grad_clip_`); what it returns is ignored.
    Returns a :class:`History`; the model is trained in place. Bad arguments
    raise ``ValueError`` before the model changes. Labels are not checked
    against the model's classes: one past the last raises torch's
    ``IndexError`` in the loss of the first step, after that step's forward
    pass has put the model in training mode and updated BN's running
    estimates.
    """
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps or epochs, got steps={steps}, epochs={epochs}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    # the labels, before the first forward pass changes any BN layer's estimates
    # (a label past the last class is caught only by the loss, after it)
    if y.dim() != 1 or y.dtype not in (torch.long, torch.uint8):  # (what cross_entropy takes)
        raise ValueError(f"y must hold class indices, a (N,) tensor of dtype torch.long (or uint8), "
                         f"got {tuple(y.shape)} {y.dtype}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"y must hold class indices >= 0, got {int(y.min())}")
    if clip_gradients is not None and not callable(clip_gradients):
        raise ValueError(f"clip_gradients must be a callable model -> None or None, got {clip_gradients!r}")
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None:
            check_integer_at_least(name, value, 0)
    n = x.shape[0]
    if n == 0:
        raise ValueError("x has no rows: expected at least one training example")
    if batch_size is not None and not (isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
                                       and 1 <= batch_size <= n):
        raise ValueError(f"batch_size must be in [1, n={n}] (an integer), got {batch_size!r}")
    m = n if batch_size is None else int(batch_size)
    per_epoch = n // m
    total = int(steps) if steps is not None else int(epochs) * per_epoch
    opt = _optimizer(model, optimizer, lr, momentum, weight_decay, decay_bn, exempt_from_decay)
    gen = torch.Generator().manual_seed(seed)
    history = History()
    model.train()
    if callback is not None:
        callback(0, model)
    step = 0
    while step < total:
        for idx in minibatches(n, m, gen):
            if step == total:
                break
            opt.zero_grad(set_to_none=True)
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            loss.backward()
            if clip_gradients is not None:
                clip_gradients(model)
            opt.step()
            step += 1
            history.step.append(step)
            history.loss.append(float(loss.detach()))
            history.accuracy.append(accuracy(logits.detach(), y[idx]))
            if callback is not None:
                callback(step, model)
    return history


def unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of each output unit's slice of ``t``, shaped to broadcast against ``t``.

    A weight of ``Linear`` or ``Conv*d``, ``(out, in, *kernel)``, has one norm
    per output unit (row ``i``: ``t[i]``), shape ``(out, 1, 1, ...)``. A
    tensor of at most one dimension (a bias, a gain, a scalar) counts as one
    unit: its norm over every entry, shape ``()``. This is the rule of timm's
    ``adaptive_clip_grad``; the authors' JAX code differs in corner cases (it
    first drops dimensions of size 1, and takes 3-dimensional weights' norms
    along dim 0).
    """
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


def adaptive_grad_clip_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    clipping: float,
    eps: float = 1e-3,
) -> torch.Tensor:
    r"""Adaptive gradient clipping (AGC, Brock et al. 2021), in place on ``.grad``.

    For every unit ``i`` of every parameter (:func:`unitwise_norm`: a row of a
    weight, or a whole bias or gain), with weights :math:`W_i` and gradient
    :math:`G_i`,

    .. math::

        G_i \leftarrow
        \begin{cases}
            \lambda \, \dfrac{\max(\lVert W_i \rVert, \epsilon)}{\lVert G_i \rVert} \, G_i
                & \text{if } \dfrac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda, \\[1ex]
            G_i & \text{otherwise,}
        \end{cases}

    with :math:`\lambda` = ``clipping``: a unit's gradient is at most
    :math:`\lambda` times the size of its weights (or of ``eps``, if they
    are smaller). So one step of plain SGD (no momentum, no weight decay) at
    learning rate ``lr`` changes a unit's weights by at most
    ``lr * clipping`` of their size; momentum and weight decay act after the
    clipping and are not bounded by it. Unlike clipping the norm of the whole
    gradient (``torch.nn.utils.clip_grad_norm_``), the threshold scales with
    each unit's weights. ``eps`` keeps zero-initialized weights (biases, a
    SkipInit :math:`\alpha`) from having every gradient clipped to zero, but
    it caps their steps at ``lr * clipping * eps`` while they are small. The
    paper clips every layer except the final classifier, with
    :math:`\lambda` from 0.01 to 0.16, smaller for larger batches.

    ``parameters``: a tensor or an iterable of tensors (e.g.
    ``model.parameters()``); those whose ``.grad`` is None are skipped, and a
    tensor given twice is clipped once. The weights are not changed. Norms
    are taken in float32 for float16 and bfloat16 tensors (a float16 norm
    overflows above 65504). A unit whose gradient is not finite (inf or NaN)
    is left as it is and not counted, as ``clip_grad_norm_`` leaves
    non-finite gradients to the caller. Returns the number of clipped units,
    an int64 tensor on the first gradient's device: no host synchronization
    when every gradient is on that device (units on other devices are
    counted there, a copy per parameter; ``tensor(0)`` for no gradients).

    Raises ``ValueError`` (and changes no gradient) for ``clipping`` or
    ``eps`` that is not a finite number > 0 (Python or NumPy; a bool is
    refused).
    """
    check_positive_finite("clipping", clipping)
    check_positive_finite("eps", eps)
    clipping, eps = float(clipping), float(eps)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    unique = {id(p): p for p in parameters if p.grad is not None}
    parameters = list(unique.values())
    clipped = torch.zeros((), dtype=torch.int64,
                          device=parameters[0].grad.device if parameters else None)
    with torch.no_grad():
        for p in parameters:
            dtype = _compute_dtype(p.dtype)  # half: norms in float32
            max_norm = clipping * unitwise_norm(p.detach().to(dtype)).clamp_min(eps)
            grad_norm = unitwise_norm(p.grad.to(dtype))
            # NaN > max_norm is False; inf is excluded by hand
            too_large = (grad_norm > max_norm) & torch.isfinite(grad_norm)
            # where too_large, grad_norm > max_norm >= clipping * eps > 0: no division by 0
            scale = torch.where(too_large, max_norm / grad_norm.clamp_min(torch.finfo(grad_norm.dtype).tiny), 1.0)
            p.grad.mul_(scale.to(p.grad.dtype))
            clipped = clipped + too_large.sum().to(clipped.device)
    return clipped


def _per_sample_cross_entropy(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample, shape ``(N,)``."""
    return F.cross_entropy(output, y, reduction="none")


def per_sample_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _per_sample_cross_entropy,
) -> dict[str, torch.Tensor]:
    r"""The gradient of each sample's loss, in the graph of the whole batch.

    One forward pass of the batch ``x`` (``(N, ...)``), in the model's own
    modes (a BN layer in training mode uses the batch statistics, one in eval
    mode its running estimates), gives the per-sample losses
    :math:`\ell_i = \text{loss}(\text{model}(x), y)_i`; then, for every
    sample ``i`` and every parameter :math:`\theta` that requires grad,

    .. math::

        g_i = \frac{\partial \ell_i}{\partial \theta}, \qquad
        \sum_{i=1}^{N} g_i = \frac{\partial}{\partial \theta} \sum_{i=1}^{N} \ell_i
                        = N \, \frac{\partial L}{\partial \theta}, \quad
        L = \frac{1}{N} \sum_i \ell_i .

    The sum holds for any model. But :math:`\ell_i` is differentiated with
    every other sample held at its value, not removed: with BN in training
    mode, ``mu`` and ``var`` depend on all of ``x``, so ``g_i`` depends on
    the other samples too. (The gradient of sample ``i`` fed alone, as a batch
    of one, is another thing: for BN in training mode, another network.)

    ``loss(output, y)`` must return one value per sample, shape ``(N,)``,
    differentiable with respect to the parameters; the default is the
    cross-entropy with ``reduction="none"``. Returns a dict
    ``name -> tensor of shape (N, *param.shape)``, one entry per parameter
    that requires grad, in ``model.named_parameters()`` order (zeros where
    :math:`\ell_i` does not reach the parameter): ``N`` times as many numbers
    as the parameters. No parameter changes, ``.grad`` is left as it was,
    every buffer (BN's running statistics, ``num_batches_tracked``) is
    restored after the forward pass and every submodule keeps its own
    train/eval mode (:func:`bnlib.models.buffers_kept`,
    :func:`bnlib.models.modes_kept`), also when something raises.

    Randomness in the forward pass (dropout) is drawn once, in its one
    forward pass: all the ``g_i`` see the same masks, and they add up to the
    gradient of the batch with those masks. The masks come from torch's
    global generator, which advances, so two calls give different ``g_i``;
    ``torch.manual_seed(s)`` before a call repeats it (and, before a forward
    pass of the batch, draws the same masks).

    Cost: computed simply, one forward pass, then one ``torch.autograd.grad``
    per sample with ``retain_graph=True``: ``N`` backward passes (on a small
    MLP, about 10 to 20 times one batch's forward and backward pass at
    ``N = 32``, about 100 times at ``N = 256``). Two faster routes give the
    same numbers where they apply: one batched backward pass,
    ``torch.autograd.grad(losses, params, grad_outputs=torch.eye(N),
    is_grads_batched=True)``, and, for a model in which no layer looks
    across samples (no BN in training mode), ``torch.func.vmap`` over
    ``torch.func.grad`` of one sample's loss, each sample a batch of one.

    Raises ``ValueError`` (and changes nothing) for a model that is not an
    ``nn.Module`` or has no parameter that requires grad, ``x`` and ``y``
    that are not tensors with the same ``N >= 1``, a ``loss`` that is not
    callable, returns another shape or does not depend on the parameters
    (a detached output), and for a call under ``torch.inference_mode()`` or
    with ``x`` or ``y`` made there (inference tensors, which autograd cannot
    record). Errors of the model itself propagate, e.g. BN in training mode
    refuses a batch of one (``N = 1`` with one value per channel).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"x must be (N, ...) and y (N, ...) with the same N >= 1, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if torch.is_inference_mode_enabled():
        raise ValueError("per_sample_gradients needs autograd, which is off under torch.inference_mode(): "
                         "call it outside that block")
    if x.is_inference() or y.is_inference():
        raise ValueError("x and y must be normal tensors, got an inference tensor (made under "
                         "torch.inference_mode(), which autograd cannot record): pass x.clone() made outside it")
    if not callable(loss):
        raise ValueError(f"loss must be a callable (output, y) -> per-sample losses (N,), got {loss!r}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad: there is no gradient to split")
    n = x.shape[0]
    params = [p for _, p in named]
    with buffers_kept(model), modes_kept(model), torch.enable_grad():
        losses = loss(model(x), y)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss must return one value per sample, shape ({n},), got {shape}; "
                             f"for a torch loss, pass reduction='none'")
        if not losses.requires_grad:
            raise ValueError("loss(model(x), y) does not require grad: it is detached from the parameters "
                             "(e.g. computed from output.detach()), so there is no gradient to split")
        per_sample = [[] for _ in params]
        for i in range(n):
            grads = torch.autograd.grad(losses[i], params, retain_graph=i < n - 1, allow_unused=True)
            for k, (p, g) in enumerate(zip(params, grads)):
                per_sample[k].append(torch.zeros_like(p) if g is None else g.detach())
    return {name: torch.stack(gs) for (name, _), gs in zip(named, per_sample)}
