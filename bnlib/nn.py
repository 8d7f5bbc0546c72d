"""bnlib's torch modules, in one namespace (as ``torch.nn``).

Each is a drop-in for the torch module of the same name where torch has
one, with the backward pass written by hand:

- batch norm: ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d`` (``bnlib.batchnorm``), and
  ``LazyBatchNorm1d/2d/3d``, which take ``num_features`` from their first input
- across processes and virtual batches: ``SyncBatchNorm`` (``bnlib.sync_batchnorm``),
  ``GhostBatchNorm`` (``bnlib.ghost_batchnorm``)
- the alternatives: ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d``
  (and ``LazyInstanceNorm1d/2d/3d``), ``FilterResponseNorm`` (with its thresholded
  linear unit; torch has none),
  ``BatchRenorm1d/2d``, ``weight_norm``, ``weight_standardization``, ``spectral_norm``
  (``bnlib.alternatives``)
- conditional: ``ConditionalBatchNorm1d/2d/3d``, BN with one gamma and beta
  per class (``bnlib.conditional``, which also has AdaIN); torch has none
- fine-tuning: ``FrozenBatchNorm``, BN with its statistics and affine
  parameters fixed, in every mode (``bnlib.frozen_batchnorm``; torchvision's
  ``FrozenBatchNorm2d`` for any ``(N, C, *)``)
- ``InputError``, what they raise for a bad input: a ``ValueError`` and a
  ``RuntimeError`` (torch's type for most of the same mistakes); for an
  argument of the wrong type its subclass ``InputTypeError``, a
  ``TypeError`` too
"""

from bnlib._checks import InputError, InputTypeError
from bnlib.alternatives import (
    BatchRenorm1d,
    FilterResponseNorm,
    BatchRenorm2d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LazyInstanceNorm1d,
    LazyInstanceNorm2d,
    LazyInstanceNorm3d,
    RMSNorm,
    spectral_norm,
    weight_norm,
    weight_standardization,
)
from bnlib.batchnorm import (  # noqa: F401
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    _BatchNorm,
    _NormBase,
)
from bnlib.conditional import ConditionalBatchNorm1d, ConditionalBatchNorm2d, ConditionalBatchNorm3d
from bnlib.frozen_batchnorm import FrozenBatchNorm
from bnlib.ghost_batchnorm import GhostBatchNorm
from bnlib.sync_batchnorm import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "GhostBatchNorm",
    "FrozenBatchNorm",
    "ConditionalBatchNorm1d",
    "ConditionalBatchNorm2d",
    "ConditionalBatchNorm3d",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "FilterResponseNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "weight_norm",
    "weight_standardization",
    "spectral_norm",
    "InputError",
    "InputTypeError",
]
