r"""Small, seeded experiments for the chapters "What BN does to training" (6)
and "BN in real networks" (11).

Each runner trains the book's multilayer perceptrons (:func:`bnlib.models.make_mlp`)
with the book's loop (:func:`bnlib.training.train`) on a data split
(:class:`bnlib.data.Split`) and returns plain numbers or NumPy arrays, one
entry per seed, so the chapter shows the mean and the spread:

- :func:`run_seeds`, :func:`seed_values`: ``fn(seed)`` for several seeds; mean and std.
- :func:`steps_to_accuracy`: the first step at which an accuracy curve reaches a target.
- :class:`EvalCurve`, :class:`UnitPercentiles`: training callbacks that record
  the test accuracy, and the 15th/50th/85th percentiles of one unit's input,
  every few steps.
- :func:`build_mlp`: the network of a run, :func:`bnlib.models.make_mlp`
  with dropout after every hidden activation (:func:`add_dropout`).
- :class:`RunResult`: what one run leaves (training history, test curve,
  final losses and accuracies, extra recordings, the trained model).
- :func:`train_run`: one seeded training run with those recordings;
  :func:`evaluate_batch_stats`: test accuracy with BN using the test set's own statistics.
- :func:`figure1_run` (the paper's Figure 1), :func:`lr_table` (its
  learning-rate comparison), :func:`init_scale_sweep`, :func:`batch_size_sweep`,
  :func:`generalization_gap` (train/test gap with BN and with dropout).
- :func:`variance_shift` (chapter 11): per unit of a BN layer, the variance
  of its input at inference over its ``running_var``, the variance shift that
  dropout before BN causes.
- :func:`stream_std` (chapter 11): the standard deviation of the residual
  stream of a :func:`bnlib.models.make_resmlp` network after the stem and
  after each block; :func:`branch_ratios`: how large each block's branch is
  against the stream it reads.
- :func:`pretrain`, :func:`fine_tune_run` (chapter 11): pretrain on some
  classes, fine-tune on a few examples of others with BN in training mode or
  frozen (:class:`bnlib.nn.FrozenBatchNorm <bnlib.frozen_batchnorm.FrozenBatchNorm>`), or train from scratch.
- :func:`train_domain_batches` (chapter 11): training on several domains,
  every mini-batch drawn from one domain, the domains taking turns.
- :func:`add_dropout`, :func:`class_subset`, :func:`class_split`,
  :func:`format_table`: helpers.

Every run draws its parameters from ``seed`` (:func:`bnlib.models.make_mlp`'s ``seed``),
its mini-batches from ``seed`` (:func:`bnlib.training.train`'s generator) and dropout masks
from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so the
caller's random state is untouched and the same call gives the same numbers
(with one thread).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnlib import models, moving_average, recorders, training
from bnlib._checks import check_integer_at_least
from bnlib.data import Split
from bnlib.frozen_batchnorm import FrozenBatchNorm

__all__ = [
    "seed_values",
    "run_seeds",
    "steps_to_accuracy",
    "EvalCurve",
    "UnitPercentiles",
    "RunResult",
    "add_dropout",
    "build_mlp",
    "train_run",
    "figure1_run",
    "lr_table",
    "init_scale_sweep",
    "evaluate_batch_stats",
    "batch_size_sweep",
    "class_subset",
    "class_split",
    "generalization_gap",
    "batch_noise",
    "format_table",
    "variance_shift",
    "stream_std",
    "branch_ratios",
    "pretrain",
    "fine_tune_run",
    "train_domain_batches",
]

#: The percentiles the paper's Figure 1 shows.
PERCENTILES = (15, 50, 85)


# --------------------------------------------------------------------------
# Seeds and summaries
# --------------------------------------------------------------------------


def seed_values(fn: Callable[[int], Any], seeds: Sequence[int]) -> np.ndarray:
    """``fn(seed)`` for every seed, stacked: shape ``(n_seeds,) + shape of one result``.

    ``fn`` returns a number or anything ``np.asarray`` turns into a float
    array of a fixed shape (a tuple of numbers, an array).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: expected at least one seed")
    for s in seeds:  # (0.5 and 1.9 were run as seeds 0 and 1)
        check_integer_at_least("every seed", s, 0)
    return np.stack([np.asarray(fn(int(s)), dtype=np.float64) for s in seeds])


def run_seeds(fn: Callable[[int], Any], seeds: Sequence[int]) -> tuple[np.ndarray | float, np.ndarray | float]:
    r"""Mean and standard deviation of ``fn(seed)`` over ``seeds``.

    With results :math:`v_1, \dots, v_n` (one per seed),

    .. math:: \bar v = \frac1n \sum_i v_i, \qquad s = \sqrt{\frac1n \sum_i (v_i - \bar v)^2}

    (the population std, ``ddof=0``, as in :func:`bnlib.plotting.layer_table`),
    elementwise when ``fn`` returns an array. Scalars come back as floats.
    """
    v = seed_values(fn, seeds)
    mean, std = v.mean(axis=0), v.std(axis=0)
    if v.ndim == 1:
        return float(mean), float(std)
    return mean, std


def steps_to_accuracy(history, target: float) -> int | None:
    """The first recorded step whose accuracy is ``>= target``; ``None`` if it never is.

    ``history`` is anything with parallel lists ``step`` and ``accuracy``: a
    :class:`bnlib.training.History` (batch accuracy after each update) or the
    test-accuracy curve of an :class:`EvalCurve`.
    """
    steps, acc = list(history.step), list(history.accuracy)
    if len(steps) != len(acc):
        raise ValueError(f"history.step and history.accuracy differ in length: {len(steps)} and {len(acc)}")
    for s, a in zip(steps, acc):
        if a >= target:
            return int(s)
    return None


# --------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------


class EvalCurve:
    """Training callback: every ``every`` steps, ``(loss, accuracy)`` of the model on ``(x, y)``.

    Evaluation is :func:`bnlib.training.evaluate`, in eval mode (BN uses its
    running statistics), full batch, without gradients. The curve is a
    :class:`bnlib.training.History` in ``self.history`` (step 0 is the
    initial model), so :func:`steps_to_accuracy` reads it.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, every: int = 10):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.x, self.y, self.every = x, y, every
        self.history = training.History()

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every == 0:
            loss, acc = training.evaluate(model, self.x, self.y)
            self.history.step.append(step)
            self.history.loss.append(loss)
            self.history.accuracy.append(acc)


class UnitPercentiles:
    r"""Training callback: percentiles of one hidden unit's input over a fixed batch.

    Every ``every`` steps the model runs on ``x_probe`` (shape ``(N, d)``) through
    :func:`bnlib.recorders.probe` and the input of the activation function of
    hidden layer ``layer`` (``-1``: the last), unit ``unit``, is taken: ``z``
    without BN, ``BN(z) = gamma * x_hat + beta`` with it, ``N`` values. Their
    ``q``-th percentiles (NumPy's default linear interpolation) go into
    ``self.values``, shape ``(n_snapshots, len(q))``, with ``self.steps``.

    ``train=True`` (default) probes in training mode: BN normalizes with the
    statistics of ``x_probe`` itself, as it would for a batch of these
    inputs; the running statistics are left untouched either way.
    """

    def __init__(
        self,
        x_probe: torch.Tensor,
        layer: int = -1,
        unit: int = 0,
        every: int = 10,
        q: Sequence[float] = PERCENTILES,
        train: bool = True,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.x_probe, self.layer, self.unit, self.every = x_probe, layer, unit, every
        self.q, self.train = tuple(q), train
        self.steps: list[int] = []
        self._values: list[np.ndarray] = []

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every == 0:
            rec = recorders.probe(model, self.x_probe, train=self.train)
            u = rec.act_in[self.layer][:, self.unit].double().numpy()
            self.steps.append(step)
            self._values.append(np.percentile(u, self.q))

    @property
    def values(self) -> np.ndarray:
        return np.array(self._values).reshape(len(self._values), len(self.q))


class WeightRows:
    r"""Training callback: the rows of the hidden layers' weight matrices, one row per unit.

    At every call, the mean over the units of every hidden layer
    (:func:`bnlib.models.get_layers` ``(model, "fc")``) of the row norm
    :math:`\|w_j\|` goes into ``self.norms``, with ``self.steps``; from the
    second call on, the mean angle (radians) between each row and the same
    row at the previous call,
    :math:`\arccos\bigl(w_j \cdot w_j' / (\|w_j\|\,\|w_j'\|)\bigr)`,
    goes into ``self.angles``. When BN follows a layer, the loss depends only
    on the direction of each row (BN's scale invariance), so the angle is
    what a step changes, and the norm sets how far a gradient step turns it:
    about :math:`\eta \|g\| / \|w\|` with :math:`\|g\| \propto 1/\|w\|`.
    """

    def __init__(self):
        self.steps: list[int] = []
        self.norms: list[float] = []
        self.angles: list[float] = []
        self._previous: list[torch.Tensor] | None = None

    def __call__(self, step: int, model: nn.Module) -> None:
        rows = [layer.weight.detach().double().clone() for layer in models.get_layers(model, "fc")]
        if not rows:
            raise ValueError("WeightRows needs a network with hidden layers fc1, fc2, ... (bnlib.models.make_mlp)")
        self.steps.append(step)
        self.norms.append(float(torch.cat([w.norm(dim=1) for w in rows]).mean()))
        if self._previous is not None:
            cosines = torch.cat([F.cosine_similarity(w, w_old, dim=1) for w, w_old in zip(rows, self._previous)])
            self.angles.append(float(torch.arccos(cosines.clamp(-1.0, 1.0)).mean()))
        self._previous = rows


# --------------------------------------------------------------------------
# Models and one run
# --------------------------------------------------------------------------


def add_dropout(model: nn.Sequential, p: float) -> nn.Sequential:
    """A new ``nn.Sequential`` with the layers of a :func:`bnlib.models.make_mlp` network (the
    same modules, shared: training one trains the other) and ``nn.Dropout(p)``
    after every hidden activation.

    The new layers are named ``drop1``, ``drop2``, ... (after ``act1``, ``act2``,
    ...), so :func:`bnlib.models.get_layers` still finds ``fc``/``norm``/``act``.
    Dropout zeroes each activation with probability ``p`` in training mode and
    scales the rest by ``1 / (1 - p)``; in eval mode it is the identity.
    ``p = 0`` returns ``model`` itself.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0:
        return model
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, module in model.named_children():
        layers[name] = module
        if name.startswith("act") and name[3:].isdigit():
            layers["drop" + name[3:]] = nn.Dropout(p)
    return nn.Sequential(layers)


def build_mlp(
    in_features: int,
    out_features: int,
    *,
    activation: str = "relu",
    norm: str | None = None,
    norm_position: str = "before",
    weight_scale: float | None = 1.0,
    dropout: float = 0.0,
    hidden: int = 100,
    depth: int = 3,
    seed: int = 0,
) -> nn.Sequential:
    r""":func:`bnlib.models.make_mlp` (``depth`` hidden layers of ``hidden`` units), then :func:`add_dropout`.

    ``weight_scale=s``: hidden weights from :math:`\mathcal{N}(0, s^2/\text{fan\_in})`
    and zero biases (see ``make_mlp``); ``None``: torch's default. Input
    ``(N, in_features)``, output ``(N, out_features)`` logits.
    """
    model = models.make_mlp(
        in_features, hidden, out_features, depth=depth, activation=activation,
        norm=norm, norm_position=norm_position, weight_scale=weight_scale, seed=seed,
    )
    return add_dropout(model, dropout)


@dataclass
class RunResult:
    """What one run leaves: the training :class:`~bnlib.training.History` (one entry per update),
    the test curve (an :class:`EvalCurve`'s History, or ``None``), the final
    ``(loss, accuracy)`` on the training and test sets (eval mode), any
    extra recordings (``extras["percentiles"]``: an :class:`UnitPercentiles`),
    and the trained ``model``."""

    history: training.History
    test: training.History | None
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    extras: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None


def train_run(
    data: Split,
    *,
    activation: str = "relu",
    norm: str | None = None,
    norm_position: str = "before",
    weight_scale: float | None = 1.0,
    dropout: float = 0.0,
    hidden: int = 100,
    depth: int = 3,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = 60,
    lr: float = 0.1,
    momentum: float = 0.0,
    seed: int = 0,
    eval_every: int | None = None,
    callbacks: Mapping[str, Callable[[int, nn.Module], None]] | None = None,
) -> RunResult:
    """Build a network with :func:`build_mlp` and train it with :func:`bnlib.training.train` (plain SGD).

    Give ``steps`` or ``epochs``. ``eval_every``: record the test curve
    every that many steps (``None``: only the final numbers). ``callbacks``:
    more training callbacks by name; they come back in ``extras``.
    Final accuracies are in eval mode, on the whole training and test sets.
    """
    x, y = data.x_train, data.y_train
    model = build_mlp(
        x.shape[1], int(max(data.y_train.max(), data.y_test.max())) + 1,
        activation=activation, norm=norm, norm_position=norm_position, weight_scale=weight_scale,
        dropout=dropout, hidden=hidden, depth=depth, seed=seed,
    )
    calls: list[Callable[[int, nn.Module], None]] = []
    curve = None
    if eval_every is not None:
        curve = EvalCurve(data.x_test, data.y_test, every=eval_every)
        calls.append(curve)
    extras = dict(callbacks or {})
    calls.extend(extras.values())

    def callback(step, m):
        for c in calls:
            c(step, m)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        hist = training.train(
            model, x, y, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
            momentum=momentum, seed=seed, callback=callback if calls else None,
        )
    tr_loss, tr_acc = training.evaluate(model, x, y)
    te_loss, te_acc = training.evaluate(model, data.x_test, data.y_test)
    return RunResult(hist, curve.history if curve else None, tr_loss, tr_acc, te_loss, te_acc, extras, model)


# --------------------------------------------------------------------------
# The chapter's experiments
# --------------------------------------------------------------------------


def figure1_run(
    data: Split,
    norm: str | None,
    seed: int = 0,
    *,
    steps: int = 600,
    batch_size: int = 60,
    lr: float = 0.5,
    every: int = 20,
    unit: int = 0,
    x_probe: torch.Tensor | None = None,
) -> RunResult:
    """The paper's Figure 1 at small scale: 3 hidden layers of 100 sigmoid units, with or without BN.

    Records every ``every`` steps the test accuracy (``result.test``) and
    the 15th/50th/85th percentiles of the input to the sigmoid of unit
    ``unit`` in the last hidden layer over ``x_probe`` (default: the test
    inputs), in ``result.extras["percentiles"]`` (an :class:`UnitPercentiles`).
    """
    probe = UnitPercentiles(data.x_test if x_probe is None else x_probe, layer=-1, unit=unit, every=every)
    return train_run(
        data, activation="sigmoid", norm=norm, steps=steps, batch_size=batch_size, lr=lr,
        seed=seed, eval_every=every, callbacks={"percentiles": probe},
    )


def lr_table(
    data: Split,
    configs: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    target: float,
    *,
    steps: int = 300,
    every: int = 10,
    **common,
) -> dict[str, dict[str, np.ndarray]]:
    """Steps to a target test accuracy and the final test accuracy, per configuration and seed.

    ``configs[name]`` holds :func:`train_run` arguments (``activation``,
    ``norm``, ``lr``, ...) that override ``common``. Returns, for every name,
    a dict of arrays:

    - ``"steps"`` ``(n_seeds,)``: the first evaluated step (every ``every``)
      with test accuracy ``>= target``, NaN for a seed that never got there;
    - ``"final"`` ``(n_seeds,)``: the test accuracy after ``steps`` updates;
    - ``"curve"`` ``(n_seeds, n_evals)``: the test accuracy at ``"eval_steps"``
      ``(n_evals,)`` = ``0, every, 2 * every, ...``.
    """
    out = {}
    for name, cfg in configs.items():
        kw = {**common, **cfg}
        runs = [train_run(data, steps=steps, eval_every=every, seed=int(seed), **kw) for seed in seeds]
        if not runs:
            raise ValueError("seeds is empty: expected at least one seed")
        reached = [steps_to_accuracy(r.test, target) for r in runs]
        out[name] = {
            "steps": np.array([np.nan if s is None else s for s in reached], dtype=np.float64),
            "final": np.array([r.test_acc for r in runs]),
            "curve": np.array([r.test.accuracy for r in runs]),
            "eval_steps": np.array(runs[0].test.step),
        }
    return out


def init_scale_sweep(
    data: Split,
    scales: Sequence[float],
    seeds: Sequence[int],
    norms: Sequence[str | None] = (None, "bn"),
    **kw,
) -> dict[str | None, np.ndarray]:
    """Final test accuracy for every weight-initialization scale ``s`` (``W ~ N(0, s^2/fan_in)``).

    ``kw`` goes to :func:`train_run` (``activation``, ``steps``, ``lr``, ...).
    Returns ``{norm: array (n_seeds, n_scales)}``.
    """
    return {
        norm: np.stack(
            [seed_values(lambda seed, s=s: train_run(data, norm=norm, weight_scale=s, seed=seed, **kw).test_acc, seeds)
             for s in scales],
            axis=1,
        )
        for norm in norms
    }


def evaluate_batch_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(loss, accuracy)`` on ``(x, y)`` with BN using the statistics of ``x`` itself (training mode).

    Like :func:`bnlib.training.evaluate`, but BN normalizes with the batch
    mean and variance of all of ``x`` instead of its running estimates
    (dropout, if any, is switched off). Every buffer and the mode are
    restored, so the model is unchanged. Compared with ``evaluate`` it
    separates "the network learned badly" from "its running statistics are off".
    """
    with models.buffers_kept(model), models.modes_kept(model):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        with torch.no_grad():
            logits = model(x)
            return float(torch.nn.functional.cross_entropy(logits, y)), training.accuracy(logits, y)


def batch_size_sweep(
    data: Split,
    batch_sizes: Sequence[int],
    seeds: Sequence[int],
    norms: Sequence[str | None] = (None, "bn"),
    *,
    epochs: int = 1,
    **kw,
) -> dict[str | None, dict[str, np.ndarray]]:
    """Final test accuracy for every mini-batch size, at a fixed number of epochs.

    Every run sees the same number of examples (``epochs`` passes over the
    training set, so ``epochs * (n // m)`` updates for batch size ``m``) at
    the same learning rate. Returns ``{norm: {"test": a, "batch_stats": b}}``
    with arrays of shape ``(n_seeds, n_batch_sizes)``: ``a`` the test accuracy
    in eval mode (BN with its running statistics), ``b`` the test accuracy
    with BN using the statistics of the whole test set
    (:func:`evaluate_batch_stats`; equal to ``a`` without BN).
    """
    out = {}
    for norm in norms:
        cols = []
        for m in batch_sizes:

            def one(seed, m=m):
                r = train_run(data, norm=norm, batch_size=m, epochs=epochs, seed=seed, **kw)
                return r.test_acc, evaluate_batch_stats(r.model, data.x_test, data.y_test)[1]

            cols.append(seed_values(one, seeds))
        v = np.stack(cols, axis=1)  # (n_seeds, n_batch_sizes, 2)
        out[norm] = {"test": v[..., 0], "batch_stats": v[..., 1]}
    return out


def class_subset(data: Split, n_per_class: int, seed: int = 0) -> Split:
    """The same split with only ``n_per_class`` training examples of every class (the test set is kept).

    The examples are the first ``n_per_class`` of each class in a random
    order drawn from ``seed``; the result is ordered by that permutation.
    """
    y = data.y_train
    classes = torch.unique(y)
    counts = torch.stack([(y == c).sum() for c in classes])
    check_integer_at_least("n_per_class", n_per_class, 1)  # (1.5 was taken as 2)
    if n_per_class > int(counts.min()):
        raise ValueError(f"n_per_class must be in [1, {int(counts.min())}], got {n_per_class}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    taken = {int(c): 0 for c in classes}
    keep = []
    for i in perm.tolist():
        c = int(y[i])
        if taken[c] < n_per_class:
            taken[c] += 1
            keep.append(i)
    idx = torch.tensor(keep)
    return Split(data.x_train[idx], y[idx], data.x_test, data.y_test)


def class_split(data: Split, classes: Sequence[int]) -> Split:
    """The training and test rows of ``data`` whose label is one of ``classes``,
    relabelled ``0, 1, ...`` in the order of ``classes`` (digits 5-9 become 0-4)."""
    classes = list(classes)
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in classes):
        raise ValueError(f"classes must be integer labels, got {classes}")
    classes = [int(c) for c in classes]
    present = set(torch.unique(data.y_train).tolist())
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= present:
        raise ValueError(f"classes must be distinct labels of the training set {sorted(present)}, got {classes}")
    relabel = {c: i for i, c in enumerate(classes)}

    def rows(x, y):
        keep = torch.isin(y, torch.tensor(classes))
        return x[keep], torch.tensor([relabel[int(v)] for v in y[keep]], dtype=y.dtype)

    return Split(*rows(data.x_train, data.y_train), *rows(data.x_test, data.y_test))


def generalization_gap(
    data: Split,
    configs: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    **common,
) -> dict[str, dict[str, np.ndarray]]:
    """Train and test accuracy (eval mode) and their gap, per configuration and seed.

    ``configs[name]`` holds :func:`train_run` arguments (``norm``,
    ``dropout``, ...) that override ``common`` (``epochs``, ``lr``, ...).
    Returns ``{name: {"train": (n_seeds,), "test": (n_seeds,), "gap": train - test,
    "test_loss": (n_seeds,)}}``.
    """
    out = {}
    for name, cfg in configs.items():
        kw = {**common, **cfg}

        def one(seed, kw=kw):
            r = train_run(data, seed=seed, **kw)
            return r.train_acc, r.test_acc, r.test_loss

        v = seed_values(one, seeds)
        out[name] = {"train": v[:, 0], "test": v[:, 1], "gap": v[:, 0] - v[:, 1], "test_loss": v[:, 2]}
    return out


def batch_noise(
    model: nn.Module,
    x_probe: torch.Tensor,
    x_pool: torch.Tensor,
    batch_size: int,
    draws: int = 50,
    seed: int = 0,
) -> np.ndarray:
    r"""How much a sample's activations move with its batch companions, per hidden layer.

    Each probe row :math:`x_i` is put into ``draws`` training-mode batches
    with ``batch_size - 1`` companions drawn without replacement from
    ``x_pool`` (a new draw each time, from a generator seeded with ``seed``).
    For every activation layer :math:`l` with output :math:`h^{[l]}`, the
    relative noise of row :math:`i` compares the spread over the draws ``d``
    with the mean over them, unit by unit (``j``), as root mean squares over
    the units:

    .. math::

        r_i^{[l]} = \sqrt{\frac{\operatorname{mean}_j \operatorname{Var}_d\, h^{[l]}_{ij}}
                          {\operatorname{mean}_j (\operatorname{mean}_d\, h^{[l]}_{ij})^2}},

    averaged over the probe rows: a float64 array of one value per
    activation layer (the layers :func:`bnlib.recorders.record` sees). On
    this scale inverted dropout with probability ``p`` (each unit ``0`` or
    ``h / (1 - p)``) has the noise :math:`\sqrt{p/(1-p)}`, 1 at ``p = 0.5``,
    whatever the activations; a network without batch statistics has 0.
    Companions from a small pool share many rows when ``batch_size`` is a
    large part of it, which lowers the noise. The model's buffers and modes
    are restored (:func:`bnlib.recorders.probe`); dropout inside the model
    adds its own noise, drawn under ``torch.manual_seed(seed)`` in a forked
    generator.
    """
    check_integer_at_least("batch_size", batch_size, 2)
    check_integer_at_least("draws", draws, 2)
    if x_pool.shape[0] < batch_size - 1:
        raise ValueError(f"x_pool must hold at least batch_size - 1 = {batch_size - 1} rows, "
                         f"got {x_pool.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    per_row = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for row in x_probe:
            seen = []   # per draw: the probe row's activations, one tensor per layer
            for _ in range(draws):
                companions = x_pool[torch.randperm(x_pool.shape[0], generator=generator)[: batch_size - 1]]
                recording = recorders.probe(model, torch.cat([row[None], companions]), train=True)
                seen.append([a[0].double() for a in recording.a])
            layers = (torch.stack([draw[layer] for draw in seen]) for layer in range(len(seen[0])))
            per_row.append([float((h.var(0, unbiased=False).mean() / h.mean(0).pow(2).mean()).sqrt())
                            for h in layers])
    return np.asarray(per_row).mean(axis=0)


def format_table(
    rows: Mapping[str, Mapping[str, np.ndarray]],
    columns: Mapping[str, str],
    header: str = "",
) -> str:
    """A fixed-width text table of ``mean±std`` over seeds (std with ``ddof=0``).

    ``rows[label][key]`` is an array over seeds; ``columns`` maps each key
    to a format, e.g. ``{"final": "{:.3f}", "steps": "{:.0f}"}``. NaN
    entries (a target never reached) are left out of the mean and counted:
    a cell reads ``mean±std (k/n)`` when only ``k`` of ``n`` seeds count,
    and ``never`` when none does.
    """
    cells = {}
    for label, row in rows.items():
        cells[label] = []
        for key, fmt in columns.items():
            v = np.asarray(row[key], dtype=np.float64).ravel()
            ok = v[~np.isnan(v)]
            if ok.size == 0:
                cells[label].append("never")
                continue
            text = fmt.format(ok.mean()) + "±" + fmt.format(ok.std())
            if ok.size < v.size:
                text += f" ({ok.size}/{v.size})"
            cells[label].append(text)
    cols = list(columns)
    w0 = max([len(header)] + [len(k) for k in cells])
    ws = [max([len(c)] + [len(cells[k][j]) for k in cells]) for j, c in enumerate(cols)]
    lines = [header.ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, ws))]
    for label, row in cells.items():
        lines.append(label.ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(row, ws)))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# BN in real networks (residual blocks, dropout before BN)
# --------------------------------------------------------------------------


def variance_shift(model: nn.Module, norm: nn.Module, x: torch.Tensor) -> np.ndarray:
    r"""Per unit of the BN layer ``norm``: the variance of its input at inference over ``running_var``.

    Runs ``model`` in eval mode on ``x`` (dropout off, BN on its running
    statistics), records the input of ``norm`` and returns
    :math:`\mathrm{Var}_{\text{eval}}[z_j] / \text{running\_var}_j`, shape ``(C,)``
    (Li et al. 2019's variance shift). 1 means BN normalizes at inference as it
    did in training; below 1, the normalized outputs come out too small by its
    square root. The model's mode is restored afterwards.
    """
    if getattr(norm, "running_var", None) is None:
        raise ValueError("variance_shift needs a BN layer that keeps running statistics (running_var)")
    seen = {}
    handle = norm.register_forward_hook(lambda module, inputs, output: seen.__setitem__("z", inputs[0].detach()))
    try:
        with models.modes_kept(model), torch.no_grad():
            model.eval()
            model(x)
    finally:
        handle.remove()
    if "z" not in seen:
        raise ValueError("variance_shift: the BN layer given is not part of the model's forward pass")
    z = seen["z"].double()
    if z.dim() > 2:  # (N, C, *spatial): a channel's values over every axis but 1, as BN takes them
        z = z.transpose(0, 1).flatten(1).t()
    return (z.var(dim=0, unbiased=True) / norm.running_var.double()).numpy()


def stream_std(model: nn.Sequential, x: torch.Tensor) -> np.ndarray:
    """The standard deviation of the residual stream after the stem and after each block of :func:`bnlib.models.make_resmlp`.

    Training mode (batch statistics), no gradients, running statistics left as
    they were. Returns ``(blocks + 1,)``: index 0 after the stem, ``b`` after block ``b``.
    """
    steps = list(_blocks_in_training_mode(model, x))
    return np.array([float(steps[0][1].std())] + [float(h_out.std()) for _, _, h_out in steps])


def branch_ratios(model: nn.Sequential, x: torch.Tensor) -> np.ndarray:
    r"""How large each block's branch is against the stream it reads, in a :func:`bnlib.models.make_resmlp` network.

    For block :math:`b` with input :math:`h_{b-1}` (the stream) and what it adds,
    :math:`\alpha F(h_{b-1})` (:math:`\alpha = 1` without SkipInit), the ratio
    of root mean squares over the batch and the units,

    .. math::

        r_b = \frac{\sqrt{\operatorname{mean}\, (\alpha F(h_{b-1}))^2}}{\sqrt{\operatorname{mean}\, h_{b-1}^2}} :

    near 0, the block is close to the identity; near 1 or above, it changes
    the stream as much as the stream itself. Training mode (batch
    statistics), no gradients, modes and running statistics left as they
    were. Returns ``(blocks,)``, entry ``b - 1`` for block ``b``.
    """
    out = []
    for block, h, _ in _blocks_in_training_mode(model, x):
        added = block.branch(h)
        if block.alpha is not None:
            added = block.alpha * added
        out.append(float(added.pow(2).mean().sqrt() / h.pow(2).mean().sqrt()))
    return np.array(out)


def _blocks_in_training_mode(model: nn.Sequential, x: torch.Tensor):
    # For each block of a make_resmlp network: (block, its input, its output),
    # in training mode (batch statistics), without gradients; afterwards the
    # modes and the running statistics are as they were. The caller's loop
    # body runs inside those settings too, so consume it to the end.
    with models.buffers_kept(model), models.modes_kept(model), torch.no_grad():
        model.train()
        h = model.stem(x)
        for name, block in model.named_children():
            if name.startswith("block"):
                h_out = block(h)
                yield block, h, h_out
                h = h_out


def pretrain(source: Split, *, epochs: int = 10, batch_size: int = 32, lr: float = 0.1, seed: int = 0) -> nn.Sequential:
    """The network of :func:`fine_tune_run`, :func:`build_mlp` with BN (3 hidden layers of 100),
    trained on all of ``source``'s training rows: ``epochs`` of SGD in mini-batches of
    ``batch_size`` (at least 2: BN in training mode), learning rate ``lr``. Returned in
    training mode."""
    check_integer_at_least("batch_size", batch_size, 2)
    check_integer_at_least("epochs", epochs, 0)
    model = build_mlp(source.x_train.shape[1], int(source.y_train.max()) + 1, norm="bn", seed=seed)
    training.train(model, source.x_train, source.y_train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    return model


def with_new_head(pretrained: nn.Module, n_classes: int, seed: int = 0) -> nn.Module:
    """A copy of ``pretrained`` (from :func:`pretrain`) with a new output layer ``out`` for ``n_classes``.

    The new layer is torch's default ``nn.Linear``, drawn from
    ``torch.manual_seed(seed)`` in a forked generator (the caller's random
    state is left alone). ``pretrained`` itself is not changed.
    """
    if not isinstance(getattr(pretrained, "out", None), nn.Linear):
        raise ValueError(f"pretrained must be a network from pretrain(), with an output layer 'out', "
                         f"got {type(pretrained).__name__}")
    model = copy.deepcopy(pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.out = nn.Linear(model.out.in_features, n_classes)
    return model


def fine_tune_run(
    target: Split,
    pretrained: nn.Module | None = None,
    *,
    frozen: bool = False,
    batch_size: int,
    n_per_class: int,
    epochs: int = 30,
    lr: float = 0.05,
    seed: int = 0,
    precise_bn_batch: int | None = None,
) -> float:
    """Fine-tune a copy of ``pretrained`` (from :func:`pretrain`) on ``n_per_class`` training
    examples of every class of ``target``; return the test accuracy on ``target`` (eval mode).

    The copy gets a new output layer for ``target``'s classes (drawn from
    ``seed``), then ``epochs`` of SGD on every parameter, in mini-batches of
    ``batch_size``, with its BN layers

    - ``frozen=False``: in training mode, as usual (batch statistics; the
      running statistics move to the target's);
    - ``frozen=True``: replaced by :class:`bnlib.nn.FrozenBatchNorm <bnlib.frozen_batchnorm.FrozenBatchNorm>`, their
      pretrained statistics and ``gamma``, ``beta`` fixed.

    ``pretrained=None`` trains the same network from scratch instead (the
    baseline; ``frozen`` must be False). ``pretrained`` itself is not changed.
    ``precise_bn_batch=b`` (BN in training mode only): after fine-tuning,
    recompute the running statistics with
    :func:`bnlib.moving_average.precise_bn` over the fine-tuning examples in
    batches of ``b``, in their order, before the test; this separates what
    small batches did to the weights from what they did to the running
    statistics. Every argument is checked before any training.
    """
    check_integer_at_least("batch_size", batch_size, 1 if frozen else 2)
    check_integer_at_least("epochs", epochs, 0)
    if precise_bn_batch is not None:
        if frozen:
            raise ValueError("precise_bn_batch needs BN in training mode: frozen layers keep the pretrained statistics")
        check_integer_at_least("precise_bn_batch", precise_bn_batch, 2)
    n_target_classes = int(target.y_train.max()) + 1
    if pretrained is None:
        if frozen:
            raise ValueError("frozen=True needs a pretrained network: there are no statistics to freeze")
        model = build_mlp(target.x_train.shape[1], n_target_classes, norm="bn", seed=seed)
    else:
        model = with_new_head(pretrained, n_target_classes, seed)
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        if first.in_features != target.x_train.shape[1]:
            raise ValueError(f"pretrained takes {first.in_features} features, target has {target.x_train.shape[1]}")
        if frozen:
            FrozenBatchNorm.convert_frozen_batchnorm(model)
    subset = class_subset(target, n_per_class, seed=seed)
    training.train(model, subset.x_train, subset.y_train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    if precise_bn_batch is not None:
        moving_average.precise_bn(model, torch.split(subset.x_train, precise_bn_batch))
    return training.evaluate(model, target.x_test, target.y_test)[1]


def train_domain_batches(
    model: nn.Module,
    domains: Sequence[torch.Tensor],
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float = 0.1,
    seed: int = 0,
    mix: bool = False,
) -> list[float]:
    """Train ``model`` on several domains, each mini-batch from one domain (or, with ``mix``, from all).

    ``domains``: input tensors of the same rows in each domain (``(N, d)`` each,
    for example the images and a transformed copy), all with the labels ``y``
    (``(N,)``). Every epoch draws, for each domain ``k``, its own random order
    (a generator seeded from ``seed * len(domains) + k``, so no two seeds
    share one) cut into mini-batches of ``batch_size`` (the last, smaller one
    dropped), and takes one SGD step (learning rate ``lr``) on a batch of each
    domain in turn: domain 0, 1, ..., 0, 1, ... So every BN layer is trained
    on the statistics of one domain at a time, while its running estimates
    average the domains' batch statistics: their means, and the variances
    *within* each domain (no batch holds two domains, so the spread between
    their means never enters). With the default momentum 0.1 the domain of
    the last batch weighs a little more (about 0.53 of two).

    ``mix=True`` is the other way to batch the same data: every step's batch
    of ``batch_size`` rows holds ``batch_size // len(domains)`` rows of each
    domain, domain 0's first (each domain's order cut into batches of that
    size, the remainder dropped), so the batch statistics in training are
    the mixture's, like the running estimates. Each epoch again shows every
    row of every domain once, apart from the dropped remainder; when ``N`` is
    a multiple of ``batch_size`` the steps are as many and as large as with
    ``mix=False``. ``batch_size`` must then be a multiple of ``len(domains)``.
    Returns the loss of every step; the model is trained in place, in
    training mode (``model.train()`` applies to every submodule).
    """
    if len(domains) < 1:
        raise ValueError("domains must hold at least one input tensor")
    n = y.shape[0]
    for k, x in enumerate(domains):
        if x.shape[0] != n:
            raise ValueError(f"every domain must have the {n} rows of y, domain {k} has {x.shape[0]}")
    check_integer_at_least("batch_size", batch_size, 2)
    check_integer_at_least("epochs", epochs, 0)
    if batch_size > n:
        raise ValueError(f"batch_size must be at most the {n} rows, got {batch_size}")
    if mix and batch_size % len(domains):
        raise ValueError(
            f"with mix=True batch_size must be a multiple of the {len(domains)} domains, got {batch_size}"
        )
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    generators = [torch.Generator().manual_seed(seed * len(domains) + k) for k in range(len(domains))]
    rows_per_domain = batch_size // len(domains) if mix else batch_size
    losses = []
    model.train()

    def step(x: torch.Tensor, labels: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    for _ in range(epochs):
        orders = [training.minibatches(n, rows_per_domain, g) for g in generators]
        for indices in zip(*orders):
            if mix:
                step(torch.cat([x[idx] for x, idx in zip(domains, indices)]),
                     torch.cat([y[idx] for idx in indices]))
            else:
                for x, idx in zip(domains, indices):
                    step(x[idx], y[idx])
    return losses
