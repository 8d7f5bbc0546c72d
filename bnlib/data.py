r"""Data sets for the book's experiments: generated here or bundled with scikit-learn.

Nothing is downloaded. Inputs are standardized with statistics of the
training split only (no data leakage): for feature ``j``,

.. math::

    \mu_j = \frac{1}{n}\sum_{i=1}^{n} x_{ij}, \qquad
    \mathrm{std}_j = \sqrt{\frac{1}{n}\sum_{i=1}^{n} (x_{ij} - \mu_j)^2}, \qquad
    x'_{ij} = \frac{x_{ij} - \mu_j}{\mathrm{std}_j},

over the ``n`` training rows; a feature that is constant on the training
split (e.g. a pixel that is always blank) gets ``mu_j`` = its value and
``std_j = 1``, so it becomes exactly 0 instead of NaN (the rule of
:func:`bnlib.features.standardize_fit`, which computes them).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from bnlib._checks import check_integer_at_least
from bnlib.features import standardize_fit

__all__ = [
    "Split",
    "fit_standardizer",
    "standardize",
    "load_digits_split",
    "load_digit_pixels",
    "gaussian_blobs",
    "two_spirals_split",
    "blur_images",
]


class Split(NamedTuple):
    """A train/test split: ``x_*`` of shape ``(n, d)`` (float), ``y_*`` of shape ``(n,)`` (int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def fit_standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature ``(mu, std)`` of ``x`` (shape ``(n, d)``), biased std; a
    constant feature gets its value and 1 (:func:`bnlib.features.standardize_fit`)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"expected a 2-D array (n, d) with n >= 1, got shape {x.shape}")
    return standardize_fit(x)


def standardize(x: np.ndarray, mu: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mu) / std`` with statistics from :func:`fit_standardizer`."""
    return (np.asarray(x, dtype=np.float64) - mu) / std


def _standardized_split(x_train, y_train, x_test, y_test, dtype: torch.dtype) -> Split:
    """A :class:`Split` of tensors, both inputs standardized with the training rows' ``mu`` and ``std``."""
    mu, std = fit_standardizer(x_train)
    return Split(
        torch.as_tensor(standardize(x_train, mu, std), dtype=dtype),
        torch.as_tensor(y_train, dtype=torch.int64),
        torch.as_tensor(standardize(x_test, mu, std), dtype=dtype),
        torch.as_tensor(y_test, dtype=torch.int64),
    )


def _digits_arrays(test_size: float, seed: int):
    """scikit-learn's 8x8 digits, pixels 0-16, split ``(x_train, x_test, y_train, y_test)``:
    stratified by class, reproducible (``seed``)."""
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    return train_test_split(digits.data, digits.target, test_size=test_size, random_state=seed,
                            stratify=digits.target)


def load_digits_split(
    test_size: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Split:
    """scikit-learn's 8x8 digits (1797 images, 64 features, 10 classes), split and standardized.

    The split is stratified by class and reproducible (``seed``). Features are
    standardized with the training split's ``mu`` and ``std`` only, then the
    same transform is applied to the test split. Returns a :class:`Split` of
    tensors: ``x_*`` of ``dtype`` and shape ``(n, 64)``, ``y_*`` int64 of shape ``(n,)``.
    """
    x_tr, x_te, y_tr, y_te = _digits_arrays(test_size, seed)
    return _standardized_split(x_tr, y_tr, x_te, y_te, dtype)


def load_digit_pixels(test_size: float = 0.25, seed: int = 0) -> Split:
    """The same split as :func:`bnlib.data.load_digits_split`, with the pixels scaled to ``[0, 1]``
    (the raw 0-16 over 16) instead of standardized: float32 ``x_*``, int64 ``y_*``."""
    x_tr, x_te, y_tr, y_te = _digits_arrays(test_size, seed)
    as_x = lambda a: torch.as_tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return Split(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


def gaussian_blobs(
    n_samples: int,
    n_features: int = 2,
    n_classes: int = 2,
    spread: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Points around ``n_classes`` random centres: ``x = c_y + spread * e``.

    Centres ``c_k ~ N(0, 4 I)`` in ``n_features`` dimensions, labels
    ``y = i mod n_classes`` (balanced), noise ``e ~ N(0, I)``. Returns
    ``x`` of shape ``(n_samples, n_features)`` and ``y`` (int64) of shape ``(n_samples,)``.
    """
    for name, value in (("n_samples", n_samples), ("n_features", n_features), ("n_classes", n_classes)):
        check_integer_at_least(name, value, 1)
    if not 0 <= spread < math.inf:  # (NaN too)
        raise ValueError(f"spread must be a finite number >= 0, got {spread!r}")
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(n_classes, n_features, generator=g, dtype=torch.float64)
    y = torch.arange(n_samples) % n_classes
    x = centres[y] + spread * torch.randn(n_samples, n_features, generator=g, dtype=torch.float64)
    return x.to(dtype), y


def _spiral_points(rng: np.random.Generator, n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` raw points of :func:`two_spirals_split` and their labels, before standardization."""
    t = 3 * np.pi * np.sqrt(rng.uniform(0.0, 1.0, n))
    y = rng.integers(0, 2, n)
    x = t[:, None] * np.stack([np.cos(t + np.pi * y), np.sin(t + np.pi * y)], axis=1)
    return x + noise * rng.normal(size=(n, 2)), y


def two_spirals_split(
    n_train: int = 2000,
    n_test: int = 2000,
    noise: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Split:
    r"""Two interleaved spirals in the plane, one per class: a problem no straight line solves.

    Point ``i`` has label ``y_i`` (0 or 1, each with probability 1/2) and
    angle :math:`t_i = 3\pi \sqrt{u_i}`, :math:`u_i \sim U(0, 1)` (so the
    points are spread about evenly along the arm's length, 1.5 turns), and lies at

    .. math::

        x_i = t_i \,(\cos(t_i + \pi y_i),\; \sin(t_i + \pi y_i)) + \text{noise}\cdot e_i,
        \qquad e_i \sim \mathcal{N}(0, I):

    before standardization, class 1 is class 0 turned by half a turn. One
    generator (``seed``) draws the ``n_train`` training points, then the
    ``n_test`` test points, so the training split does not depend on
    ``n_test``. Both are standardized with the training split's statistics
    (the module docstring). Returns a :class:`Split`, ``x_*`` of shape ``(n, 2)``.
    """
    if n_train < 2 or n_test < 1:
        raise ValueError(f"n_train must be >= 2 and n_test >= 1, got {n_train} and {n_test}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    x_train, y_train = _spiral_points(rng, n_train, noise)
    x_test, y_test = _spiral_points(rng, n_test, noise)
    return _standardized_split(x_train, y_train, x_test, y_test, dtype)


def blur_images(x: torch.Tensor, passes: int = 1) -> torch.Tensor:
    r"""Square images, flattened to rows of ``x``, blurred ``passes`` times.

    ``x``: shape ``(n, side * side)`` (the digits: ``side = 8``). Each pass
    replaces every pixel by a weighted mean of its 3x3 neighbourhood with
    the binomial weights

    .. math::

        \frac{1}{16} \begin{pmatrix} 1 & 2 & 1 \\ 2 & 4 & 2 \\ 1 & 2 & 1 \end{pmatrix},

    the border repeated outwards, so a constant image stays as it is. The
    map is linear in the pixels but mixes neighbours: it is not a pixel-wise
    change of scale and offset. Returns a new tensor of ``x``'s shape and
    dtype; ``passes=0`` returns a copy. Raises ``ValueError`` for rows that
    are not square images or a ``passes`` that is not an int >= 0.
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
        raise ValueError(f"passes must be an int >= 0, got {passes!r}")
    side = int(round(float(x.shape[-1]) ** 0.5)) if x.ndim == 2 else 0
    if x.ndim != 2 or side < 1 or side * side != x.shape[1]:
        raise ValueError(f"expected rows of square images, shape (n, side * side), got shape {tuple(x.shape)}")
    weights = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (torch.outer(weights, weights) / 16).view(1, 1, 3, 3)
    if passes == 0:
        return x.clone()
    images = x.reshape(-1, 1, side, side)
    for _ in range(passes):
        padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
        images = torch.nn.functional.conv2d(padded, kernel)
    return images.reshape(x.shape)
