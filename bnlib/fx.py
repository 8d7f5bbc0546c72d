"""``torch.fx`` tracing of models that hold bnlib's layers.

``torch.fx.symbolic_trace`` keeps torch's own layers as single nodes
("leaf modules": it records ``call_module`` and does not look inside), but it
only knows them by the package they come from (``torch.nn``). A bnlib layer
it walks into, and its ``forward`` checks the input (its type and shape) in
Python, which fails on the trace's ``Proxy`` (``InputTypeError``). Even
where walking in worked, it would be wrong: a trace fixes what Python
computed once, so the training flag and the running estimates' update
factor (``momentum=None``'s ``1 / num_batches_tracked``) would be frozen at
their values during the trace.

:class:`Tracer` keeps bnlib's normalization layers (:data:`LEAF_MODULES`)
as leaves too: the traced graph calls the layer, which then does at every call
what it does untraced (train or eval mode, the running estimates, the
checks). :func:`symbolic_trace` is ``torch.fx.symbolic_trace`` with that
tracer. Tools built on FX take a tracer's leaf modules as an argument (for
example torchvision's ``create_feature_extractor(model, nodes,
tracer_kwargs={"leaf_modules": list(bnlib.fx.LEAF_MODULES)})``).
"""

import torch
import torch.fx

import bnlib.nn

__all__ = ["LEAF_MODULES", "Tracer", "symbolic_trace"]

#: The layer classes a trace keeps whole, every module class that
#: ``bnlib.nn`` exports (batch norm and its lazy, synchronized, ghost, frozen
#: and conditional forms, batch renorm, layer, RMS, group, instance and filter
#: response norm).
#: weight_norm, spectral_norm and weight_standardization are parametrizations
#: of torch's own layers, which FX keeps whole already.
LEAF_MODULES = tuple(
    obj for obj in (getattr(bnlib.nn, name) for name in bnlib.nn.__all__)
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module)
)


class Tracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that keeps bnlib's layers (:data:`LEAF_MODULES`) as leaves,
    as it keeps torch's."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_MODULES) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(root, concrete_args=None):
    """``torch.fx.symbolic_trace(root, concrete_args)`` with :class:`Tracer`: a
    ``torch.fx.GraphModule`` in which every bnlib layer is one ``call_module``
    node. The graph module shares ``root``'s submodules (their parameters and
    buffers), as ``torch.fx.symbolic_trace``'s does."""
    tracer = Tracer()
    graph = tracer.trace(root, concrete_args)
    name = root.__class__.__name__ if isinstance(root, torch.nn.Module) else root.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)
