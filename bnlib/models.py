r"""Small fully connected networks for the book's experiments.

``make_mlp`` builds a multilayer perceptron as one flat ``nn.Sequential``
whose layers have readable names, so hooks and plots can find them::

    fc1 -> [norm1] -> act1 -> fc2 -> [norm2] -> act2 -> ... -> act{depth} -> out

(or, with ``norm_position="after"``, ``fc1 -> act1 -> norm1 -> fc2 -> ...``).

Hidden layer ``l`` computes the pre-activation ``z`` and the activation

.. math::

    z^{[l]} = W^{[l]} a^{[l-1]} + b^{[l]},

    a^{[l]} = f\bigl(\mathrm{BN}(z^{[l]})\bigr) \ \text{(with norm)} \quad\text{or}\quad
    a^{[l]} = f(z^{[l]}) \ \text{(without)},

with ``a^{[0]} = x`` of shape ``(N, in_features)``; ``out`` maps the last
activation to ``out_features`` logits. BN sits between the linear map and the
activation function, as in Ioffe and Szegedy (2015), unless
``norm_position="after"`` puts it after the activation,
:math:`a^{[l]} = \mathrm{BN}(f(z^{[l]}))`.

The activation functions and their derivatives (closed forms) live here too:

.. math::

    \sigma(z) = \frac{1}{1 + e^{-z}},\quad \sigma'(z) = \sigma(z)(1 - \sigma(z)),

    \tanh'(z) = 1 - \tanh^2(z),\qquad \mathrm{relu}'(z) = [z > 0].

``get_layers`` returns the hidden layers of one kind (``"fc"``, ``"norm"``,
``"act"``) in order. ``make_resmlp`` builds a residual MLP whose blocks are
``ResidualBlock`` modules (two linear layers with BN each, optionally with
the last :math:`\gamma` zero-initialized); ``make_nf_resmlp`` builds its
normalizer-free counterpart from ``NFResidualBlock`` modules (Brock et al.
2021). ``modes_kept(model)`` is a context
manager for a block that may call ``model.train()`` or ``model.eval()``:
afterwards every submodule is back in its own train/eval mode (a BN layer
frozen in eval mode inside a model in training mode stays frozen); ``buffers_kept(model)`` restores
every buffer (BN's running statistics) after a block that may move them.
``ConstantStatsBatchNorm1d`` is the counterfactual of chapter 4: batch norm
whose backward pass treats the batch statistics as constants.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from bnlib._checks import check_positive_finite

__all__ = [
    "ACTIVATIONS",
    "NORM_POSITIONS",
    "activation_derivative",
    "make_mlp",
    "cancels_bias",
    "get_layers",
    "ResidualBlock",
    "make_resmlp",
    "RELU_GAIN",
    "NFResidualBlock",
    "make_nf_resmlp",
    "modes_kept",
    "buffers_kept",
    "ConstantStatsBatchNorm1d",
]

#: Where ``make_mlp`` puts a normalization layer: before or after the activation.
NORM_POSITIONS = ("before", "after")

#: The activation functions ``make_mlp`` accepts, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
}



@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Run a block that may call ``model.train()`` or ``model.eval()``; afterwards
    every submodule is back in its own mode. (``model.train(was_training)``
    would set all of them to one mode: a BN layer frozen in eval mode inside
    a model in training mode would come back unfrozen.)"""
    saved = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, mode in saved:
            module.training = mode


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Run a block that may change the model's buffers (BN's running statistics
    and ``num_batches_tracked`` move in every training-mode forward pass);
    afterwards every buffer holds its old value again, copied back in place, so
    references to the buffers stay valid."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


def _check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}"
        )
    return name


def activation_derivative(z: torch.Tensor, name: str) -> torch.Tensor:
    r"""The derivative ``f'(z)`` elementwise, in closed form, same shape as ``z``.

    - ``"sigmoid"``: :math:`\sigma(z)(1-\sigma(z))`, largest (1/4) at ``z = 0``
    - ``"tanh"``: :math:`1 - \tanh^2(z)`, largest (1) at ``z = 0``
    - ``"relu"``: 1 where ``z > 0``, else 0
    """
    _check_activation(name)
    z = torch.as_tensor(z)
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if name == "tanh":
        return 1 - torch.tanh(z) ** 2
    return (z > 0).to(z.dtype if z.is_floating_point() else torch.get_default_dtype())


def _norm_factory(norm: str | None, norm_layer: Callable[[int], nn.Module] | None):
    if norm is not None and norm_layer is not None:
        raise ValueError("give norm or norm_layer, not both")
    if norm_layer is not None:
        return norm_layer
    if norm is None:
        return None
    if norm == "bn":
        import bnlib.nn  # imported here so models works without the core loaded

        return bnlib.nn.BatchNorm1d
    raise ValueError(f"norm must be None or 'bn', got {norm!r}")


def cancels_bias(layer: nn.Module) -> bool:
    """Whether ``layer``, placed right after a linear map, makes that map's bias useless.

    True for the layers that subtract each feature's mean over the batch in
    training, BN and its variants (torch's and bnlib's batch norms, ghost
    BN, batch renorm, and ``PartialBatchNorm1d`` when it centres): a bias
    ``b`` shifts the feature and its batch mean alike, and cancels. False
    for every other layer (layer, group, instance and RMS norm, frozen BN),
    which a per-feature bias can change.
    """
    from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

    from bnlib.alternatives import _BatchRenorm
    from bnlib.batchnorm import _BatchNorm

    return isinstance(layer, (_TorchBatchNorm, _BatchNorm, _BatchRenorm)) and bool(getattr(layer, "center", True))


def _probe_cancels_bias(factory: Callable[[int], nn.Module], width: int) -> bool:
    """:func:`cancels_bias` of ``factory(width)``, built on the side: the random
    draws of the layers built after it stay as they were."""
    with torch.random.fork_rng(devices=[]):
        return cancels_bias(factory(width))


@contextlib.contextmanager
def _seeded(seed):
    """The draws of a ``with`` block: from ``torch.manual_seed(seed)``, the
    caller's random state put back afterwards; with ``seed=None`` from the
    caller's global generator, which moves on (two calls, two networks)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_mlp(
    in_features: int,
    hidden: int | Sequence[int],
    out_features: int,
    depth: int | None = None,
    activation: str = "tanh",
    norm: str | None = None,
    weight_scale: float | None = None,
    *,
    bias: bool | None = None,
    bias_init: float | None = None,
    norm_layer: Callable[[int], nn.Module] | None = None,
    norm_position: str = "before",
    seed: int | None = None,
) -> nn.Sequential:
    r"""A multilayer perceptron ``fc1, [norm1,] act1, ..., fc{depth}, [norm{depth},] act{depth}, out``.

    Parameters
    ----------
    in_features, out_features
        Input width and number of outputs (logits). Input shape ``(N, in_features)``,
        output shape ``(N, out_features)``.
    hidden
        Width of every hidden layer (an int, then ``depth`` is required), or
        one width per hidden layer (then ``depth`` is ``None`` or ``len(hidden)``).
    activation
        ``"tanh"``, ``"sigmoid"`` or ``"relu"``.
    norm
        ``None`` (no normalization) or ``"bn"``: a ``bnlib.nn.BatchNorm1d``
        between each hidden linear layer and its activation.
    norm_layer
        Instead of ``norm``: any factory ``num_features -> nn.Module`` (for
        example ``torch.nn.BatchNorm1d``); its layers are named ``norm{l}`` too.
    norm_position
        ``"before"`` (the default, the paper's place): ``fc -> norm -> act``;
        ``"after"``: ``fc -> act -> norm``, the normalized output of the
        activation feeding the next layer.
    weight_scale
        ``None``: torch's default initialization. A number ``s``: hidden weights
        drawn from :math:`\mathcal{N}(0, s^2 / \text{fan\_in})` and biases set to
        0, so ``s = 1`` keeps the variance of a linear map's output equal to that
        of its input; the ``out`` layer then gets ``s = 1``.
    bias
        Whether hidden linear layers have a bias. Default: yes, except where
        a normalization layer that subtracts each feature's mean over the
        batch follows the linear map directly (:func:`cancels_bias`: BN and
        its variants), because ``b`` cancels there. Layer, group and RMS
        norm keep a per-feature bias (layer norm cancels only its mean over
        the features), and with ``norm_position="after"`` the activation
        comes between, so those layers keep theirs.
    bias_init
        If given, every hidden bias is set to this constant (needs a bias).
    seed
        If given, the parameters are drawn from ``torch.manual_seed(seed)``
        without touching the caller's global random state.
    """
    if isinstance(hidden, int):
        if depth is None:
            raise ValueError("depth is required when hidden is an int")
        widths = [hidden] * depth
    else:
        widths = [int(h) for h in hidden]
        if depth is not None and depth != len(widths):
            raise ValueError(f"depth={depth} but {len(widths)} hidden widths were given")
    if len(widths) < 1 or min(widths) < 1:
        raise ValueError(f"need at least one hidden layer of width >= 1, got widths {widths}")
    if in_features < 1 or out_features < 1:
        raise ValueError(
            f"in_features and out_features must be >= 1, got {in_features} and {out_features}"
        )
    _check_activation(activation)
    factory = _norm_factory(norm, norm_layer)
    if norm_position not in NORM_POSITIONS:
        raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {norm_position!r}")
    if bias is None:
        bias = factory is None or norm_position == "after" or not _probe_cancels_bias(factory, widths[0])
    if bias_init is not None and not bias:
        raise ValueError("bias_init needs hidden biases: pass bias=True")
    if weight_scale is not None:
        check_positive_finite("weight_scale", weight_scale)

    with _seeded(seed):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        fan_in = in_features
        for l, width in enumerate(widths, start=1):
            fc = nn.Linear(fan_in, width, bias=bias)
            if weight_scale is not None:
                _normal_init(fc, weight_scale)
            if bias_init is not None:
                nn.init.constant_(fc.bias, bias_init)
            layers[f"fc{l}"] = fc
            if factory is not None and norm_position == "before":
                layers[f"norm{l}"] = factory(width)
            layers[f"act{l}"] = ACTIVATIONS[activation]()
            if factory is not None and norm_position == "after":
                layers[f"norm{l}"] = factory(width)
            fan_in = width
        out = nn.Linear(fan_in, out_features)
        if weight_scale is not None:
            _normal_init(out, 1.0)
        layers["out"] = out
    return nn.Sequential(layers)


def _normal_init(fc: nn.Linear, scale: float) -> None:
    """W ~ N(0, scale^2 / fan_in), b = 0."""
    with torch.no_grad():
        fc.weight.normal_(0.0, scale / fc.in_features**0.5)
        if fc.bias is not None:
            fc.bias.zero_()


def get_layers(model: nn.Module, kind: str) -> list[nn.Module]:
    """The hidden layers of one kind, in order: ``kind`` is ``"fc"``, ``"norm"`` or ``"act"``.

    ``get_layers(model, "fc")`` is ``[model.fc1, model.fc2, ...]``.
    """
    if kind not in ("fc", "norm", "act"):
        raise ValueError(f"kind must be 'fc', 'norm' or 'act', got {kind!r}")
    found = []
    for name, module in model.named_children():
        if name.startswith(kind) and name[len(kind):].isdigit():
            found.append((int(name[len(kind):]), module))
    return [m for _, m in sorted(found, key=lambda p: p[0])]


class _DefaultNorm:
    # the default normalization of the residual MLP, bnlib.nn.BatchNorm1d
    # (imported lazily); norm_layer=None means no normalization
    def __repr__(self):
        return "bnlib.nn.BatchNorm1d"


_BN = _DefaultNorm()


def _resmlp_bias(bias, factory):
    # the linear layers' biases: by default only without normalization
    if bias is None:
        return factory is None
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be True, False or None (the default), got {bias!r}")
    return bias


def _resmlp_norm(norm_layer, zero_init):
    # the factory width -> nn.Module, or None; checks the combination
    if norm_layer is _BN:
        import bnlib.nn

        return bnlib.nn.BatchNorm1d
    if norm_layer is not None and not callable(norm_layer):
        raise ValueError(f"norm_layer must be a factory width -> nn.Module or None, got {norm_layer!r}")
    if zero_init and norm_layer is None:
        raise ValueError("zero_init needs a normalization layer with a weight (gamma); "
                         "without normalization use skip_init=True")
    return norm_layer


class ResidualBlock(nn.Module):
    r"""A residual block of two linear layers, with BN by default (He et al. 2016, fully connected):

    .. math::

        h' = \mathrm{relu}\bigl(h + \alpha\,\mathrm{BN}_2(W_2\,\mathrm{relu}(\mathrm{BN}_1(W_1 h)))\bigr).

    ``norm1``, ``norm2`` are ``bnlib.nn.BatchNorm1d`` by default, or the layers
    of ``norm_layer`` (a factory ``width -> nn.Module``); with
    ``norm_layer=None`` they are ``nn.Identity``. ``bias``: whether ``fc1``
    and ``fc2`` have biases (zero at the start); default: only without
    normalization, as in ResNets, whose convolutions before a norm layer
    have none, whatever the norm (:func:`make_mlp` instead keeps them unless
    the norm cancels them; pass ``bias=True`` for that with layer norm). With ``zero_init=True`` the last norm layer
    starts with :math:`\gamma = 0` (Goyal et al. 2017), so the block starts
    as the identity on its input (after the final ReLU, which leaves a
    non-negative input unchanged). ``skip_init=True`` adds a learnable scalar
    ``alpha`` on the branch, 0 at the start (SkipInit, De and Smith 2020):
    the same identity start, with or without normalization. Without it,
    :math:`\alpha = 1` and there is no ``alpha`` parameter.
    """

    def __init__(
        self,
        width: int,
        zero_init: bool = False,
        *,
        norm_layer: Callable[[int], nn.Module] | None = _BN,
        skip_init: bool = False,
        bias: bool | None = None,
    ):
        super().__init__()
        factory = _resmlp_norm(norm_layer, zero_init)
        bias = _resmlp_bias(bias, factory)
        self.fc1 = nn.Linear(width, width, bias=bias)
        self.norm1 = nn.Identity() if factory is None else factory(width)
        self.fc2 = nn.Linear(width, width, bias=bias)
        self.norm2 = nn.Identity() if factory is None else factory(width)
        if bias:
            for fc in (self.fc1, self.fc2):
                nn.init.zeros_(fc.bias)
        if zero_init:
            if getattr(self.norm2, "weight", None) is None:
                raise ValueError(f"zero_init needs a norm layer with a weight, got {type(self.norm2).__name__}")
            nn.init.zeros_(self.norm2.weight)
        self.alpha = nn.Parameter(torch.zeros(())) if skip_init else None

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """The residual branch alone, ``BN_2(W_2 relu(BN_1(W_1 h)))`` (without ``alpha``)."""
        return self.norm2(self.fc2(torch.relu(self.norm1(self.fc1(h)))))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        f = self.branch(h)
        return torch.relu(h + (f if self.alpha is None else self.alpha * f))


def make_resmlp(
    in_features: int,
    width: int,
    out_features: int,
    blocks: int,
    *,
    zero_init: bool = False,
    norm_layer: Callable[[int], nn.Module] | None = _BN,
    skip_init: bool = False,
    weight_scale: float | None = None,
    bias: bool | None = None,
    seed: int | None = None,
) -> nn.Sequential:
    r"""A residual MLP: ``stem`` (linear, norm, ReLU), ``block1`` ... ``block{blocks}`` (:class:`ResidualBlock`), ``out``.

    Input ``(N, in_features)``, output ``(N, out_features)`` logits.
    ``zero_init``: start the last norm layer of every block with
    :math:`\gamma = 0`. ``norm_layer``: the normalization of the stem and
    of the blocks, a factory ``width -> nn.Module`` (default
    ``bnlib.nn.BatchNorm1d``); ``None``: no normalization (``nn.Identity`` in
    its place, so the module names stay). ``bias``: whether the stem's and
    blocks' linear layers have biases, all 0 at the start; default: only
    without normalization (see :class:`ResidualBlock`). ``skip_init``: a learnable scalar
    :math:`\alpha = 0` on every block's branch (De and Smith 2020).
    ``weight_scale``: ``None`` for torch's default initialization, or ``s``:
    the stem's and blocks' weights drawn from :math:`\mathcal{N}(0, s^2 /
    \text{fan\_in})`, biases 0 (``s = sqrt(2)`` is He's initialization for
    ReLU: it keeps the mean square of the ReLU outputs from layer to layer),
    and ``out`` with ``s = 1``, as in :func:`make_mlp`.
    ``seed``: draw the parameters from ``torch.manual_seed(seed)`` without
    touching the caller's random state.
    """
    if blocks < 1 or width < 1 or in_features < 1 or out_features < 1:
        raise ValueError(f"need blocks, width, in_features and out_features >= 1, got "
                         f"{blocks}, {width}, {in_features}, {out_features}")
    if weight_scale is not None:
        check_positive_finite("weight_scale", weight_scale)
    factory = _resmlp_norm(norm_layer, zero_init)
    bias = _resmlp_bias(bias, factory)
    with _seeded(seed):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["stem"] = nn.Sequential(nn.Linear(in_features, width, bias=bias),
                                       nn.Identity() if factory is None else factory(width), nn.ReLU())
        if bias:
            nn.init.zeros_(layers["stem"][0].bias)
        for b in range(1, blocks + 1):
            layers[f"block{b}"] = ResidualBlock(width, zero_init=zero_init, norm_layer=factory,
                                                skip_init=skip_init, bias=bias)
        layers["out"] = nn.Linear(width, out_features)
        if weight_scale is not None:
            for module in layers.values():
                for fc in module.modules():
                    if isinstance(fc, nn.Linear):
                        _normal_init(fc, 1.0 if module is layers["out"] else weight_scale)
    return nn.Sequential(layers)


#: The gain that makes ``RELU_GAIN * relu(x)`` have variance 1 for ``x ~ N(0, 1)``:
#: a ReLU passes on ``(1 - 1/pi) / 2`` of the variance, so ``1 / sqrt((1 - 1/pi) / 2)``, about 1.71.
RELU_GAIN = 1 / math.sqrt((1 - 1 / math.pi) / 2)


def _scaled_ws_linear(in_features: int, out_features: int) -> nn.Linear:
    # a linear layer with scaled weight standardization, bias 0 at the start
    from bnlib.nn import weight_standardization

    fc = nn.Linear(in_features, out_features)
    nn.init.zeros_(fc.bias)
    return weight_standardization(fc, scaled=True)


class NFResidualBlock(nn.Module):
    r"""A normalizer-free residual block (Brock, De and Smith 2021), fully connected, pre-activation:

    .. math::

        h' = h + \alpha\, F(h), \qquad
        F(h) = W_2\, \gamma\,\mathrm{relu}\bigl(W_1\, \gamma\,\mathrm{relu}(h / \beta)\bigr) + b_2,

    (:math:`b_1` inside, after :math:`W_1`). ``fc1``, ``fc2`` have scaled weight
    standardization (:func:`bnlib.nn.weight_standardization <bnlib.alternatives.weight_standardization>` with
    ``scaled=True``: every row of length ``|g_i|``, mean 0) and biases that
    start at 0; :math:`\gamma` = :data:`RELU_GAIN` undoes the variance a
    ReLU removes. ``beta`` is the expected standard deviation of the block's
    input ``h``: then ``h / beta`` has variance about 1, and so, at the
    start, has every unit of the branch :math:`F(h)` (for inputs that are
    Gaussian and uncorrelated), so the block adds about :math:`\alpha^2` to
    the variance of the stream. No statistic of the batch is used: each
    sample is computed alone, in training and in eval mode alike.
    ``alpha`` is a constant, not a parameter. Nothing normalizes the stream
    itself, which is why :func:`make_nf_resmlp` sets each block's ``beta``
    from the variance the blocks before it add. The authors' networks also
    multiply each branch by a learnable gain that starts at 0, as SkipInit
    does; this block leaves it out, so that every block is on from the start
    and the signal propagation above is what the network starts with.
    """

    def __init__(self, width: int, alpha: float = 0.2, beta: float = 1.0):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 2:
            raise ValueError(f"width must be an int >= 2 (weight standardization needs 2 weights per row), "
                             f"got {width!r}")
        check_positive_finite("alpha", alpha)
        check_positive_finite("beta", beta)
        self.alpha, self.beta = float(alpha), float(beta)
        self.fc1 = _scaled_ws_linear(width, width)
        self.fc2 = _scaled_ws_linear(width, width)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """The residual branch alone, ``F(h)`` (without ``alpha``)."""
        x = RELU_GAIN * torch.relu(h / self.beta)
        return self.fc2(RELU_GAIN * torch.relu(self.fc1(x)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.alpha * self.branch(h)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, beta={self.beta:.4g}"


def make_nf_resmlp(
    in_features: int,
    width: int,
    out_features: int,
    blocks: int,
    *,
    alpha: float = 0.2,
    seed: int | None = None,
) -> nn.Sequential:
    r"""A normalizer-free residual MLP (NF-ResNet, Brock, De and Smith 2021): ``stem``, ``block1`` ... ``block{blocks}``, ``relu``, ``out``.

    ``stem`` is a linear layer with scaled weight standardization (no
    activation: the blocks start with theirs), ``block{b}`` an
    :class:`NFResidualBlock` with the constant ``alpha`` and

    .. math::

        \beta_b = \sqrt{1 + (b - 1)\,\alpha^2},

    the standard deviation the stream is expected to have on entering block
    ``b`` if the stem's output has variance 1 (standardized, uncorrelated
    inputs) and every block adds :math:`\alpha^2`; after block ``b`` it is
    :math:`\sqrt{1 + b\,\alpha^2}`. Then a ReLU and ``out``, a plain
    ``nn.Linear`` to ``out_features`` logits (torch's initialization): the
    final classifier, which Brock et al. (2021, "High-performance
    large-scale image recognition without normalization") leave out of
    adaptive gradient clipping (``model[:-1]`` is everything else; see
    :func:`bnlib.training.adaptive_grad_clip_`). No layer looks at
    other samples, so the network computes the same in training and eval
    mode. ``seed`` as in :func:`make_resmlp`.
    """
    if blocks < 1 or width < 2 or in_features < 2 or out_features < 1:
        raise ValueError(f"need blocks >= 1, width >= 2, in_features >= 2 and out_features >= 1, got "
                         f"{blocks}, {width}, {in_features}, {out_features}")
    check_positive_finite("alpha", alpha)
    with _seeded(seed):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["stem"] = _scaled_ws_linear(in_features, width)
        for b in range(1, blocks + 1):
            layers[f"block{b}"] = NFResidualBlock(width, alpha, math.sqrt(1 + (b - 1) * alpha**2))
        layers["relu"] = nn.ReLU()
        layers["out"] = nn.Linear(width, out_features)
    return nn.Sequential(layers)


class ConstantStatsBatchNorm1d(nn.Module):
    r"""Batch norm of ``(N, C)`` input whose backward pass treats the batch statistics as constants.

    The forward pass is batch norm's: in training mode

    .. math::

        \mu = \frac{1}{m}\sum_i x_i, \qquad
        \sigma^2 = \frac{1}{m}\sum_i (x_i - \mu)^2, \qquad
        y_i = \gamma\,\frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta ,

    with the running estimates updated as batch norm's, and in eval mode the
    running estimates in place of :math:`\mu`, :math:`\sigma^2`. But
    :math:`\mu` and :math:`\sigma^2` are detached from the graph, so the
    gradient is :math:`\partial L/\partial x_i = \gamma\, (\partial L/\partial y_i)
    / \sqrt{\sigma^2 + \epsilon}`: the two terms of the compact formula that
    come from the statistics are missing. This is the scheme Ioffe and Szegedy
    (2015, section 2) warn against, normalization done outside the gradient
    descent step; it exists to be compared with batch norm, not to be used.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        from bnlib._checks import check_norm_args

        check_norm_args(num_features, eps, momentum)
        if momentum is None:
            raise ValueError("momentum must be a number in [0, 1], got None")
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bnlib._checks import check_batch_size, check_input_dims, check_num_channels

        name = type(self).__name__
        check_input_dims(name, x.shape, (2,))
        check_num_channels(name, x.shape, self.num_features)
        if not self.training:
            mu, var = self.running_mean, self.running_var
        else:
            check_batch_size(x.shape)
            m = x.shape[0]
            mu = x.mean(0)
            var = ((x - mu) ** 2).mean(0)
            with torch.no_grad():
                from bnlib.functional import update_running_estimates

                update_running_estimates(self.running_mean, self.running_var, mu, var * m / (m - 1),
                                         self.momentum)
            # The one change from batch norm: the statistics are constants to autograd.
            mu, var = mu.detach(), var.detach()
        return self.weight * (x - mu) / torch.sqrt(var + self.eps) + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
