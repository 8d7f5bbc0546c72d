"""The batch-norm modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

Same constructor, parameters (``weight``, ``bias``), buffers
(``running_mean``, ``running_var``, ``num_batches_tracked``) and state-dict
keys as torch's modules, so a state dict loads in either direction; the
forward pass is :func:`bnlib.functional.batch_norm`, whose backward is
written by hand.

A shared base class holds what every BN variant shares (parameters,
buffers, argument checks, the running-estimate factor); subclasses only say
which input dimensions they take. ``_NormBase`` is also the base of the
other modules with running statistics (instance norm, batch renorm, ghost
and synchronized batch norm). The public names are re-exported by
``bnlib.nn``.

``BatchNorm1d/2d/3d`` (and ``bnlib.sync_batchnorm.SyncBatchNorm``) also
derive from torch's ``torch.nn.modules.batchnorm._BatchNorm``, a second base
whose every method is overridden here (``_TorchBatchNorm`` below). torch's
utilities find batch norm layers with ``isinstance`` on that class:
``torch.optim.swa_utils.update_bn`` recomputes their running statistics,
``torch.func.replace_all_batch_norm_modules_`` prepares them for ``vmap``,
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` converts them; without
the second base they would skip bnlib's layers without a word.
``GhostBatchNorm`` is left out on purpose.

``LazyBatchNorm1d/2d/3d`` (and ``bnlib.alternatives``' lazy instance norms)
take ``num_features`` from their first input, as torch's lazy modules do
(``_LazyNorm`` below), and then become the plain module.
"""

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from bnlib import functional as bnF
from bnlib._checks import (
    InputError,
    check_eps,
    check_floating_dtype,
    check_input_dims,
    check_norm_args,
    check_num_channels,
)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]


def register_affine_parameters(module, shape, affine, bias, factory_kwargs):
    """Give ``module`` the parameters ``weight`` (gamma) and ``bias`` (beta) of
    ``shape``, or register them as ``None``: torch's names, so state dicts match.
    Shared by every normalization module of bnlib."""
    if affine:
        module.weight = nn.Parameter(torch.empty(shape, **factory_kwargs))
        if bias:
            module.bias = nn.Parameter(torch.empty(shape, **factory_kwargs))
        else:
            module.register_parameter("bias", None)
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def reset_affine_parameters(module):
    """gamma = 1, beta = 0: at the start the layer only standardizes."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class NotScriptable:
    """A mixin for bnlib's layers: ``torch.jit.script`` calls
    ``__prepare_scriptable__`` on every module it compiles, and this one
    says in one line why it cannot work (TorchScript compiles neither Python
    autograd Functions nor ``try`` blocks, nor bnlib's checks), where the
    compiler itself failed
    deep inside, a different message per layer. ``torch.jit.trace``,
    ``torch.compile`` and ``torch.export`` do not call it."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"bnlib's {type(self).__name__} cannot be compiled by TorchScript (torch.jit.script): it "
            "is written in Python that TorchScript does not compile (autograd Functions, try blocks, "
            "checks). Use torch.compile or torch.export (or torch.jit.trace) instead"
        )


class _NormBase(NotScriptable, nn.Module):
    """Parameters, buffers and argument checks shared by the BN modules."""

    # Version 2 of torch's state dict added ``num_batches_tracked``; keeping
    # the same version makes old and new torch checkpoints load alike.
    _version = 2
    allowed_dims = ()  # input dimensions the subclass takes, e.g. (2, 3)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        check_norm_args(num_features, eps, momentum)
        factory_kwargs = {"device": device, "dtype": dtype}
        # nn.Module's, by name: in BatchNorm*d the next class is torch's
        # _BatchNorm (see _TorchBatchNorm below), whose own __init__ would
        # build a second set of parameters.
        nn.Module.__init__(self)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        register_affine_parameters(self, (num_features,), affine, bias, factory_kwargs)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        """The running estimates reset (mean 0, variance 1, count 0) and
        gamma = 1, beta = 0, as torch's ``reset_parameters`` does: at the
        start the layer only standardizes."""
        self.reset_running_stats()
        reset_affine_parameters(self)

    def extra_repr(self):
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def _check_input(self, input, num_features=None):
        """Raise ``InputError`` for an input the layer does not take; ``num_features``:
        the channel count to expect, if not ``self.num_features`` (a lazy layer's first input)."""
        name = type(self).__name__
        bnF.check_tensor_input(name, input)
        if isinstance(self, _TorchCompatible):  # torch's hook, which a subclass may override
            self._check_input_dim(input)
        else:
            check_input_dims(name, input.shape, self.allowed_dims)
        check_num_channels(name, input.shape, self.num_features if num_features is None else num_features)
        check_floating_dtype(name, input.dtype, input.is_floating_point())
        if self.training:
            bnF.check_training_batch(input)

    def _check_attributes_now(self, updates):
        """``eps`` (batch statistics are used: > 0) and, where the running
        estimates are updated, ``momentum``, as they are at this call (a user
        may have set them since construction): ``InputError`` before anything
        changes. For layers that do not pass them through
        ``bnlib.functional.batch_norm``, whose checks cover the others."""
        name = type(self).__name__
        try:
            check_eps(self.eps)
        except ValueError as error:
            raise InputError(f"{name}: {error}") from None
        if updates and self.momentum is not None:
            bnF.check_momentum(name, self.momentum)

    def _count_batch(self):
        """Count one training batch; return the running update's factor.

        ``momentum``, or for ``momentum=None`` the cumulative average's
        ``1 / num_batches_tracked``. With ``num_batches_tracked`` set to None
        (torch allows it) nothing is counted and the cumulative factor is 0:
        torch's rule.

        Raises before anything changes inside a ``torch.func`` transform that
        captured the running estimates from outside (``grad`` of a module,
        ``vmap`` over inputs), which would refuse the updates; torch's own
        modules fail there too, ``vmap`` after counting the batch. Buffers
        the transform itself maps over (an ensemble from
        ``torch.func.stack_module_state``) are updated as usual.
        """
        # (Each buffer read once: a module attribute read costs 0.5 us, and
        # this runs on every training step.)
        running_mean = self.running_mean
        if running_mean is not None and bnF.captured_by_transform(running_mean):
            raise InputError(
                f"{type(self).__name__} in training mode updates its running estimates in place, which a "
                "torch.func transform (grad, vmap, jacrev, ...) does not allow for buffers from outside it: "
                "inside the transform use eval mode, or track_running_stats=False where the layer has it"
            )
        momentum = self.momentum
        factor = 0.0 if momentum is None else momentum
        count = self.num_batches_tracked
        if count is not None:
            count.add_(1)
            if momentum is None:
                # Cumulative average: after t batches, each weighs 1/t.
                # One host read per step, as in torch's own module.
                factor = 1.0 / float(count)
        return factor

    def _uncount_batch(self):
        """Take back :meth:`_count_batch`'s count, for a call that failed after it:
        the contract leaves ``num_batches_tracked`` as it was on every error."""
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.sub_(1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints older than version 2 have no num_batches_tracked: keep
        # the module's own count (0 on the meta device), as torch does.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            own = self.num_batches_tracked
            keep = own is not None and own.device != torch.device("meta")
            state_dict[key] = own if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _version(buffer):
    """The version counter of a running estimate (every in-place change adds
    one); None for no estimate, for an inference tensor, which has none, and inside
    ``torch.compile``, which cannot trace either (there a failed call takes
    its count back whatever happened before it failed)."""
    if buffer is None or torch.compiler.is_compiling() or buffer.is_inference():
        return None
    return buffer._version


class _BatchNorm(_NormBase):
    """Batch norm over every axis but the channel axis 1."""

    def forward(self, input):
        # Every check comes before any state changes (num_batches_tracked included).
        self._check_input(input)
        training = self.training
        running_mean = self.running_mean  # read once: see _count_batch
        counted = training and self.track_running_stats
        version = _version(running_mean) if counted else None
        if counted:
            factor = self._count_batch()
        else:
            factor = 0.0 if self.momentum is None else self.momentum
        # Batch statistics in training mode, and in eval mode when no running
        # estimates are kept.
        use_batch_stats = training or running_mean is None
        keep = not training or self.track_running_stats
        try:
            return bnF.batch_norm(
                input,
                running_mean if keep else None,
                self.running_var if keep else None,
                self.weight,
                self.bias,
                use_batch_stats,
                factor,
                self.eps,
            )
        except Exception:
            # What batch_norm rejects (a weight of the wrong size, an input on
            # another device) fails before the running estimates change: so
            # must the count. An exception after they changed keeps it (a
            # non-reentrant checkpoint stops its recomputation there, and
            # torch's BN has then counted the batch twice, as it updated it).
            if counted and _version(running_mean) == version:
                self._uncount_batch()
            raise


# torch's base class of its batch norms, a second base of ours: why, in the
# module docstring.
_TorchBatchNorm = nn.modules.batchnorm._BatchNorm


class _TorchCompatible:
    """What torch's base class adds that callers may use: ``_check_input_dim``,
    the dims check, which torch's batch norm calls and subclasses override
    to take other inputs; :meth:`_NormBase._check_input` calls it too."""

    def _check_input_dim(self, input):
        check_input_dims(type(self).__name__, input.shape, self.allowed_dims)


class BatchNorm1d(_TorchCompatible, _BatchNorm, _TorchBatchNorm):
    """Batch norm for ``(N, C)`` or ``(N, C, L)`` inputs."""

    allowed_dims = (2, 3)


class BatchNorm2d(_TorchCompatible, _BatchNorm, _TorchBatchNorm):
    """Batch norm for ``(N, C, H, W)`` inputs: statistics over (N, H, W)."""

    allowed_dims = (4,)


class BatchNorm3d(_TorchCompatible, _BatchNorm, _TorchBatchNorm):
    """Batch norm for ``(N, C, D, H, W)`` inputs: statistics over (N, D, H, W)."""

    allowed_dims = (5,)


# --------------------------------------------------------------------------
# Lazy modules: num_features from the first input
# --------------------------------------------------------------------------


def check_initialized(layers, caller):
    """Refuse, with ``InputError``, a lazy layer that has not seen its first input yet.

    Its parameters and running estimates have no shape until then, so
    nothing can be copied, reset or converted; ``caller`` names the
    function in the message. Called before the function changes anything.
    """
    for layer in layers:
        tensors = list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False))
        if any(is_lazy(t) for t in tensors):
            raise InputError(
                f"{caller} got a {type(layer).__name__} that has not seen an input yet (a lazy module: "
                "its parameters and running estimates have no shape): call the model on a batch first"
            )


class _LazyNorm(LazyModuleMixin):
    """What torch's lazy norm modules (``_LazyNormBase``) do, for bnlib's.

    The constructor takes the plain module's arguments without
    ``num_features``. Until the first call, ``num_features`` is 0 and the
    parameters and running estimates are uninitialized
    (``torch.nn.UninitializedParameter`` / ``UninitializedBuffer``, which
    ``.to()`` moves and casts as usual). The first call checks the input
    as the plain module will, takes the channel count from it, creates the
    tensors with their starting values (gamma 1, beta 0, mean 0, variance 1),
    turns the module into ``cls_to_become`` and runs it. A state dict loaded
    before that gives the tensors their shapes and values instead, and the
    first input must then match them. A first input the plain module would
    refuse raises ``InputError`` and leaves the module as it was, still
    lazy. Unlike torch's, ``num_features`` is inferred also when the module
    has no tensors to create (``affine=False``, ``track_running_stats=False``),
    so a later input with another channel count is refused, as by the plain
    module (torch's then takes any); and an unbatched first input of an
    instance norm counts its channels on axis 0.
    """

    cls_to_become = None  # the plain module, set by each subclass

    def __init__(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None,
                 *, bias=True):
        check_norm_args(1, eps, momentum)  # num_features comes from the first input
        factory_kwargs = {"device": device, "dtype": dtype}
        # The plain module's constructor with nothing to allocate: the tensors
        # it would make are replaced by uninitialized ones below (as torch).
        super().__init__(1, eps, momentum, False, False, device=device, dtype=dtype, bias=False)
        self.num_features = 0
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory_kwargs)
            if bias:
                self.bias = UninitializedParameter(**factory_kwargs)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory_kwargs)
            self.running_var = UninitializedBuffer(**factory_kwargs)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self):
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def _channels_of_first_input(self, input):
        """The channel count of a first input, after the checks the plain module makes (``InputError``)."""
        raise NotImplementedError

    def initialize_parameters(self, input, *args, **kwargs):
        """Called once, before the first forward (``LazyModuleMixin``'s hook)."""
        names = ("weight", "bias", "running_mean", "running_var")
        # tensors given shapes before the first call (a loaded state dict)
        shaped = {n: tuple(getattr(self, n).shape) for n in names
                  if getattr(self, n) is not None and not is_lazy(getattr(self, n))}
        channels = self._channels_of_first_input(input)  # raises before anything changes
        # and so does an input on another device, which the plain module
        # refuses only after the tensors would have been created here
        bnF.check_same_device(input, **{n: getattr(self, n) for n in names + ("num_batches_tracked",)
                                        if getattr(self, n, None) is not None})
        if channels < 1:  # the plain module's constructor refuses num_features=0
            raise InputError(f"{type(self).__name__} expected a first input with at least 1 channel, got input "
                             f"of shape {tuple(input.shape)}")
        if any(shape != (channels,) for shape in shaped.values()):
            raise InputError(
                f"{type(self).__name__} expected its loaded tensors to have shape (C,) for the first input's "
                f"C = {channels} channels (input shape {tuple(input.shape)}), got "
                + ", ".join(f"{n} {shape}" for n, shape in shaped.items())
            )
        self.num_features = channels
        with torch.no_grad():
            for n in names:
                t = getattr(self, n)
                if t is not None and is_lazy(t):
                    t.materialize((channels,))
                    # the starting values of the plain module (only where nothing was loaded)
                    t.fill_({"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}[n])


class _LazyBatchNorm(_LazyNorm):
    def _channels_of_first_input(self, input):
        self._check_input_dim(input)  # (before input.shape[1] is read)
        self._check_input(input, num_features=input.shape[1])  # the plain module's checks
        return input.shape[1]


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    """Drop-in for ``torch.nn.LazyBatchNorm1d``: a ``BatchNorm1d`` whose ``num_features`` is its first input's ``C``."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    """Drop-in for ``torch.nn.LazyBatchNorm2d``: a ``BatchNorm2d`` whose ``num_features`` is its first input's ``C``."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    """Drop-in for ``torch.nn.LazyBatchNorm3d``: a ``BatchNorm3d`` whose ``num_features`` is its first input's ``C``."""

    cls_to_become = BatchNorm3d
