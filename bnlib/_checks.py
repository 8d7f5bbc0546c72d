"""Argument checks shared by every BN variant (NumPy and torch paths).

They raise ``ValueError`` before any state is touched, with a message that
says what was expected and what came (the contract's "Bad input" section):
for a bad constructor argument a plain ``ValueError``, for a bad input an
:class:`InputError`, which is a ``ValueError`` and a ``RuntimeError`` at once.
Shapes are passed in, so this file imports neither NumPy nor torch.
"""

import math
import numbers


class InputError(ValueError, RuntimeError):
    """Bad input to a normalization function or layer (shape, channels, dtype, batch size).

    A ``ValueError``, as bnlib's contract says, and a ``RuntimeError``, which is
    what torch raises for most of the same mistakes (a channel count that is
    not ``num_features``, a shape LayerNorm was not built for, an integer
    input): code written against either library catches it. An argument of
    the wrong type raises the subclass ``InputTypeError``, a
    ``TypeError`` too, as torch raises for those.
    """


class InputTypeError(InputError, TypeError):
    """An :class:`InputError` for an argument of the wrong type (an array
    where a tensor belongs, a string for ``training``): also a ``TypeError``,
    which torch raises for these."""


def _scalar(value):
    """The number in a one-element (0-dim) tensor or array, which torch's
    constructors take for ``eps`` and ``momentum`` (``eps=torch.tensor(1e-5)``);
    anything else as it is. (Duck-typed: this file imports no torch.)"""
    if not isinstance(value, numbers.Number) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def check_norm_args(num_features, eps, momentum):
    """Validate constructor arguments: ``num_features >= 1``, ``eps > 0``,
    ``momentum`` in ``[0, 1]`` or ``None`` (cumulative average).

    NumPy scalars are accepted like Python numbers (as torch does).
    """
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
        raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
    check_eps(eps)
    if momentum is not None:
        value = _scalar(momentum)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 <= value <= 1):
            raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")


def check_input_dims(class_name, shape, allowed_dims):
    """The number of dimensions must be one of ``allowed_dims`` (e.g. (2, 3))."""
    ndim = len(shape)
    if not any(ndim == d for d in allowed_dims):  # (not `in`: torch 2.4's dynamo misjudges it for a module's SymInt)
        expected = " or ".join(f"{d}D" for d in allowed_dims)
        raise InputError(f"{class_name} expected {expected} input (got {ndim}D input)")


def check_num_channels(class_name, shape, num_features):
    """The channel axis (axis 1) must have ``num_features`` entries."""
    if len(shape) < 2 or shape[1] != num_features:
        got = shape[1] if len(shape) >= 2 else "no channel axis"
        raise InputError(
            f"{class_name} expected input with {num_features} channels (num_features) "
            f"on axis 1, got {got} (input shape {tuple(shape)})"
        )


def check_floating_dtype(class_name, dtype, is_floating_point):
    """Normalization needs a floating-point input (a mean of integers is not one)."""
    if not is_floating_point:
        raise InputError(f"{class_name} expected a floating-point input (float16, bfloat16, float32 or float64), "
                         f"got {dtype}")


def check_real_array(caller, dtype):
    """A NumPy array the NumPy references can normalize: real numbers (float,
    int, uint), not complex (its "variance" would be complex), strings,
    objects or booleans; else ``InputError`` naming ``caller``."""
    if dtype.kind not in "fiu":
        raise InputError(f"{caller} expected an array of real numbers (float or int), got dtype {dtype}")


def check_dy_shape(caller, dy_shape, expected):
    """``dy`` has the shape of the forward's input, and so of its output (NumPy would
    broadcast a (N, 1) dy without a word)."""
    if tuple(dy_shape) != tuple(expected):
        raise InputError(f"{caller} expected dy of the input's shape {tuple(expected)}, got {tuple(dy_shape)}")


def values_per_channel(shape):
    """How many values each channel holds: ``m = N * prod(spatial dims)``."""
    count = shape[0]
    for size in shape[2:]:
        count *= size
    return count


def check_batch_size(shape, size_text=None):
    """Training needs more than one value per channel, or the variance is 0/0.

    ``size_text`` is how the shape is printed (torch prints ``torch.Size([1, 3])``).
    """
    if values_per_channel(shape) == 1:
        shown = size_text if size_text is not None else str(tuple(shape))
        raise InputError(f"Expected more than 1 value per channel when training, got input size {shown}")


def check_positive_finite(name, value):
    """``value`` is a real number (Python or NumPy, not a bool) with ``0 < value < inf``,
    or a ``ValueError`` naming ``name``: an ``eps``, a clipping threshold, a gain."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_eps(eps):
    """A normalization layer's ``eps``: :func:`check_positive_finite`'s rule,
    and a 0-dim tensor taken for its number, as torch's layers take it."""
    try:
        check_positive_finite("eps", _scalar(eps))
    except ValueError:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}") from None


def check_integer_at_least(name, value, least):
    """``value`` is an integer (Python's or NumPy's, not a bool) and at least
    ``least``, or a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def check_labels(caller, labels_shape, is_integer, batch_size, lowest, highest, num_classes):
    """Class labels for a conditional layer: ``batch_size`` integers in ``[0, num_classes)``.

    ``labels_shape``: the labels' shape, which must be ``(batch_size,)``;
    ``is_integer``: whether their dtype is an integer type (bool is not);
    ``lowest``, ``highest``: their smallest and largest value (None for no
    labels, or where they cannot be read: the range is then not checked here).
    """
    if not is_integer:
        raise InputError(f"{caller} expected integer class labels (int64, int32, ...), got another dtype")
    if tuple(labels_shape) != (batch_size,):
        raise InputError(f"{caller} expected one label per sample, shape ({batch_size},), "
                         f"got shape {tuple(labels_shape)}")
    if lowest is not None and (lowest < 0 or highest >= num_classes):
        raise InputError(f"{caller} expected labels in [0, {num_classes}) (num_classes={num_classes}), "
                         f"got values from {lowest} to {highest}")
