"""torch.export and dynamic shapes with bnlib's layers.

``torch.export`` keeps an autograd Function's forward but neither its
hand-written backward nor a gradient for the C++ kernels' ops, so under
export every layer computes its formula in plain tensor ops (the path of the
``torch.func`` transforms, ``bnlib.functional.under_func_transform``). Before,
an exported module gave no gradients (float32, silently), failed on an
``out=`` write with grad on (layer, group, instance, RMS and filter response
norm whenever the kernels had not run yet, and every half input), named
``bnlib_cpu`` ops that a fresh process has not registered, and fixed the
batch size. The kernels' op schemas take ``SymInt`` sizes, so
``torch.compile(dynamic=True)`` compiles one frame for every batch size, as
for torch's layers (it compiled one per size).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import bnlib.cpu_kernels
import bnlib.nn as bnn

LAYERS = {
    "BatchNorm2d": lambda: bnn.BatchNorm2d(4),
    "LayerNorm": lambda: bnn.LayerNorm([4, 5, 5]),
    "GroupNorm": lambda: bnn.GroupNorm(2, 4),
    "InstanceNorm2d": lambda: bnn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    "RMSNorm": lambda: bnn.RMSNorm([5]),
    "FilterResponseNorm": lambda: bnn.FilterResponseNorm(4),
    "BatchRenorm2d": lambda: bnn.BatchRenorm2d(4),
    "GhostBatchNorm": lambda: bnn.GhostBatchNorm(4, virtual_batch_size=3),
    "SyncBatchNorm": lambda: bnn.SyncBatchNorm(4),
}


# (Not momentum=None in training: its factor 1 / num_batches_tracked is a
# Python number read from a buffer, which export cannot trace; torch's batch
# norm fails there the same way.)


def model_with(name):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), LAYERS[name]())


@pytest.fixture(autouse=True, scope="module")
def kernels_loaded():
    """With the C++ kernels loaded (the usual state after any eager call),
    as an exported program must not depend on it."""
    bnlib.cpu_kernels.load()


def ops_of(program):
    """Every op the program calls, in its graph and in the graphs nested in it
    (a no_grad region, for one)."""
    return {str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if node.op == "call_function"}


def run(model, x):
    """Output, input gradient, first-layer weight gradient and the norm's buffers after one step."""
    x = x.clone().requires_grad_()
    y = model(x)
    # (not y.pow(2).sum(): after batch norm that is a constant, its gradient rounding noise)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(dy)
    params = dict(model.named_parameters())
    # buffers by name: torch 2.4's unlifted program orders them by first use and
    # leaves out one the graph does not touch (num_batches_tracked in eval)
    return [y.detach(), x.grad, params["0.weight"].grad], {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_exported_module_computes_and_trains_as_the_eager_one(name, training, dtype):
    eager = model_with(name).to(dtype).train(training)
    exported_from = model_with(name).to(dtype).train(training)
    x = torch.randn(6, 3, 5, 5, dtype=dtype)
    program = torch.export.export(exported_from, (x,))
    assert not any("bnlib" in op for op in ops_of(program)), ops_of(program)
    # saved and loaded: a training program held a no_grad region, which
    # torch 2.13 saves but cannot load
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    (want, want_buffers), (got, got_buffers) = run(eager, x), run(torch.export.load(buffer).module(), x)
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    dropped = set(want_buffers) - set(got_buffers)
    assert set(got_buffers) <= set(want_buffers) and all(n.endswith("num_batches_tracked") for n in dropped), dropped
    got, want = got + [got_buffers[n] for n in got_buffers], want + [want_buffers[n] for n in got_buffers]
    for g, w in zip(got, want):
        assert g is not None
        if g.is_floating_point() and dtype == torch.bfloat16:
            torch.testing.assert_close(g.float(), w.float(), rtol=0.02, atol=0.02)
        else:
            torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("name", ["BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm2d"])
def test_export_with_a_dynamic_batch(name):
    model = model_with(name).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (torch.randn(4, 3, 5, 5),), dynamic_shapes=({0: batch},))
    x = torch.randn(9, 3, 5, 5)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: bnn.BatchNorm1d(3), lambda: bnn.BatchRenorm1d(3)], ids=["bn", "renorm"])
def test_an_exported_training_program_refuses_one_value_per_channel(make):
    """Export takes a dynamic size to be at least 2, so the eager check is
    settled while tracing; the program checks the batch itself (it divided
    by ``m - 1 = 0``), before any buffer changes."""
    model = make().train()
    program = torch.export.export(model, (torch.randn(4, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = program.module()
    before = {name: b.clone() for name, b in exported.named_buffers()}
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel when training"):
        exported(torch.randn(1, 3))
    for name, b in exported.named_buffers():
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)
    assert exported(torch.randn(5, 3)).shape == (5, 3)


def test_an_exported_program_loads_without_bnlib(tmp_path):
    """Only torch's ops: the saved program loads in a process that has not
    imported bnlib (it named ``bnlib_cpu`` ops, unregistered there)."""
    import subprocess
    import sys

    model = model_with("GroupNorm").eval()
    x = torch.randn(2, 3, 5, 5)
    model(x)  # the kernels run eagerly first
    path = tmp_path / "program.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    torch.save(x, tmp_path / "x.pt")
    code = (f"import torch; p = torch.export.load({str(path)!r}); "
            f"print(tuple(p.module()(torch.load({str(tmp_path / 'x.pt')!r})).shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(2, 4, 5, 5)"


@pytest.mark.parametrize("name", ["BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm2d"])
def test_compile_with_dynamic_shapes_compiles_once(name):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = LAYERS[name]()
    model(torch.randn(8, 4, 5, 5))  # the kernels run eagerly first
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True)
    for batch in (2, 5, 17):
        compiled(torch.randn(batch, 4, 5, 5))
    assert counter.frame_count == 1


def test_a_subclass_overriding_check_input_dim_is_obeyed():
    """torch's batch norm calls ``_check_input_dim``; a subclass widens it."""

    class BatchNorm2dAlso3d(bnn.BatchNorm2d):
        def _check_input_dim(self, input):
            if input.dim() not in (3, 4):
                raise ValueError(f"expected 3D or 4D input (got {input.dim()}D input)")

    layer = BatchNorm2dAlso3d(3)
    assert layer(torch.randn(4, 3, 5)).shape == (4, 3, 5)
    with pytest.raises(ValueError, match="3D or 4D"):
        layer(torch.randn(4, 3))
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("make,shape", [(bnn.LazyBatchNorm2d, (4, 0, 5, 5)), (bnn.LazyInstanceNorm1d, (4, 0, 5))])
def test_a_lazy_layer_refuses_a_first_input_without_channels(make, shape):
    layer = make()
    with pytest.raises(ValueError, match="at least 1 channel"):
        layer(torch.randn(shape))
    assert layer.has_uninitialized_params() and layer.num_features == 0


def test_conditional_batch_norm_exports_and_checks_its_labels_in_the_graph():
    """Its label check read the labels' range back (``.item()``), which
    export cannot trace; there an op of the graph asserts the range."""
    torch.manual_seed(0)
    eager, exported_from = bnn.ConditionalBatchNorm2d(4, 3), bnn.ConditionalBatchNorm2d(4, 3)
    x, labels = torch.randn(6, 4, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    program = torch.export.export(exported_from, (x, labels))
    assert not any("bnlib" in op for op in ops_of(program))
    module = program.module()
    torch.testing.assert_close(module(x, labels), eager(x, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.norm.running_var, eager.norm.running_var, rtol=1e-6, atol=1e-6)
    before = [b.clone() for b in module.buffers()]
    with pytest.raises(RuntimeError, match=r"labels in \[0, 3\)"):
        module(x, torch.tensor([0, 1, 2, 0, 1, 3]))
    assert all(torch.equal(a, b) for a, b in zip(module.buffers(), before))  # nothing written back
    compiled = torch.compile(bnn.ConditionalBatchNorm2d(4, 3), backend="eager", fullgraph=True)
    assert compiled(x, labels).shape == x.shape


@pytest.mark.parametrize("make", [
    lambda: bnlib.nn.BatchNorm2d(3), lambda: bnlib.nn.SyncBatchNorm(3),
    lambda: bnlib.nn.GhostBatchNorm(3, virtual_batch_size=2), lambda: bnlib.nn.BatchRenorm2d(3),
    lambda: bnlib.nn.InstanceNorm2d(3), lambda: bnlib.nn.LayerNorm(3), lambda: bnlib.nn.RMSNorm(3),
    lambda: bnlib.nn.GroupNorm(1, 3), lambda: bnlib.nn.FilterResponseNorm(3),
    lambda: bnlib.nn.ConditionalBatchNorm2d(3, num_classes=2),
    lambda: bnlib.nn.weight_norm(nn.Linear(3, 3)).parametrizations.weight[0],
    lambda: bnlib.nn.spectral_norm(nn.Linear(3, 3)).parametrizations.weight[0],
    lambda: bnlib.nn.weight_standardization(nn.Linear(3, 3)).parametrizations.weight[0],
], ids=lambda make: type(make()).__name__)
def test_torchscript_is_refused_with_one_clear_message(make):
    """The compiler itself failed deep inside, a different message per layer
    (a try block, an AttributeError of its frontend); torch.jit.trace works."""
    import warnings

    layer = make()
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=f"bnlib's {type(layer).__name__} "
                                                  r"cannot be compiled by TorchScript \(torch.jit.script\)"):
        warnings.simplefilter("ignore")  # (torch 2.13 deprecates TorchScript)
        torch.jit.script(torch.nn.Sequential(torch.nn.Identity(), layer))
