"""bnlib: Batch Normalization from first principles.

Two paths through the same math:

- ``bnlib.reference``: NumPy only, readable, the formulas of the book.
- ``bnlib.functional`` and ``bnlib.nn``: torch, any device, hand-written
  backward passes, drop-in replacements for ``torch.nn.BatchNorm*d``.

Submodules are imported on first use, so ``import bnlib.reference`` never
imports torch.
"""

import importlib

__version__ = "0.1.0"

def _submodules():
    """The public modules of the package: every ``bnlib/<name>.py`` not starting with '_'."""
    import pkgutil

    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name):
    if name in _submodules():
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_submodules()))
