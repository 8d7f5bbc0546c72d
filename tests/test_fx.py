"""bnlib.fx: torch.fx traces of models with bnlib's layers, which stay whole.

The truth is the untraced model: a traced copy must give the same outputs,
gradients and running estimates, in training and in eval mode, switched
after tracing (a trace that had walked into a layer would have fixed the
mode and the update factor).
"""

import copy

import pytest
import torch

import bnlib.fx
import bnlib.nn as bnn


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        bnn.BatchNorm2d(8, momentum=None),  # the cumulative average: factor 1/t at step t
        torch.nn.ReLU(),
        bnn.GroupNorm(2, 8),
        bnn.GhostBatchNorm(8, 2),
        bnn.InstanceNorm2d(8, affine=True),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 6),
        bnn.LayerNorm(6),
        bnn.BatchRenorm1d(6),
        bnn.FrozenBatchNorm(6),
    )


def test_plain_fx_cannot_trace_a_bnlib_layer():
    """Why bnlib.fx exists: torch.fx walks into the layer and fails on its checks."""
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(torch.nn.Sequential(bnn.BatchNorm1d(3)))


def test_every_bnlib_layer_is_one_call_module_node():
    model = _model()
    traced = bnlib.fx.symbolic_trace(model)
    called = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    layers = {name for name, m in model.named_children() if type(m).__module__.startswith("bnlib.")}
    assert len(layers) == 7 and layers <= called
    assert not [node for node in traced.graph.nodes if node.op == "call_function"]


def test_traced_model_trains_and_evaluates_as_the_original():
    original = _model()
    traced = bnlib.fx.symbolic_trace(copy.deepcopy(original))
    for step in range(3):
        x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(step))
        outputs = []
        for model in (original, traced):
            model.zero_grad(set_to_none=True)
            y = model(x)
            y.square().sum().backward()
            outputs.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(outputs[0][0], outputs[1][0])
        for a, b in zip(outputs[0][1], outputs[1][1]):
            torch.testing.assert_close(a, b)
    for (name, a), (_, b) in zip(original.state_dict().items(), traced.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert int(traced.state_dict()["1.num_batches_tracked"]) == 3
    original.eval(), traced.eval()  # switched after tracing: the layers read it at each call
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(original(x), traced(x))


def test_conditional_layer_with_labels_and_lazy_layer():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lazy, self.cond = bnn.LazyBatchNorm1d(), bnn.ConditionalBatchNorm1d(4, 3)

        def forward(self, x, labels):
            return self.cond(self.lazy(x), labels)

    traced, reference = bnlib.fx.symbolic_trace(Net()), Net()  # the lazy layer not yet built
    x, labels = torch.randn(10, 4), torch.randint(0, 3, (10,))
    torch.testing.assert_close(traced(x, labels), reference(x, labels))
    assert isinstance(traced.lazy, bnn.BatchNorm1d) and traced.lazy.num_features == 4
    with pytest.raises(ValueError, match="labels"):
        traced(x, torch.full((10,), 3))  # the layer's own checks still run
