"""bnlib's layers under torch.func transforms (grad, jacrev, jacfwd, vmap, hessian).

The hand-written autograd Functions have no vmap or forward-mode rules, so
under a transform every entry point computes the same map in plain tensor
ops (``bnlib.functional.under_func_transform``). The truth here is bnlib's
own eager path (checked against torch.nn elsewhere) and torch's modules
under the same transforms. In-place running-estimate updates cannot happen
under a transform into buffers captured from outside it (``grad`` of a module,
``vmap`` over inputs): bnlib says so before it changes anything. The rest
updates its buffers as the eager path does (through ``out=``, the write the
transforms allow): functional batch norm and instance norm under ``grad``,
spectral norm's power iteration, and an ensemble vmapped over its stacked
buffers.
"""

import copy

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import bnlib.nn
from bnlib import alternatives
from bnlib import functional as bnF

pytestmark = pytest.mark.usefixtures("each_cpu_path")

X2 = (6, 3)  # (N, C)
X4 = (4, 4, 3, 3)  # (N, C, H, W)

# name -> (constructor, input shape, training mode)
LAYERS = {
    "BatchNorm1d eval": (lambda: bnlib.nn.BatchNorm1d(3), X2, False),
    "BatchNorm1d batch statistics": (lambda: bnlib.nn.BatchNorm1d(3, track_running_stats=False), X2, True),
    "BatchNorm2d eval": (lambda: bnlib.nn.BatchNorm2d(4), X4, False),
    "BatchNorm2d batch statistics": (lambda: bnlib.nn.BatchNorm2d(4, track_running_stats=False), X4, True),
    "GroupNorm": (lambda: bnlib.nn.GroupNorm(2, 4), X4, True),
    "LayerNorm": (lambda: bnlib.nn.LayerNorm([4, 3, 3]), X4, True),
    "RMSNorm": (lambda: bnlib.nn.RMSNorm([3, 3]), X4, True),
    "InstanceNorm2d": (lambda: bnlib.nn.InstanceNorm2d(4, affine=True), X4, True),
    "BatchRenorm2d eval": (lambda: bnlib.nn.BatchRenorm2d(4), X4, False),
    "weight_norm": (lambda: alternatives.weight_norm(torch.nn.Linear(3, 2)), X2, True),
    "weight_standardization": (lambda: alternatives.weight_standardization(torch.nn.Linear(3, 2), scaled=True),
                               X2, True),
    "spectral_norm eval": (lambda: alternatives.spectral_norm(torch.nn.Linear(3, 2)), X2, False),
}


def make_layer(name, seed=0):
    """The layer in float64 with non-trivial parameters and running estimates, and an input."""
    constructor, shape, training = LAYERS[name]
    torch.manual_seed(seed)
    layer = constructor().double().train(training)
    with torch.no_grad():
        for tensor in list(layer.parameters()) + [b for b in layer.buffers() if b.is_floating_point()]:
            tensor.copy_(tensor + 0.3 * torch.rand_like(tensor))  # running_var stays positive
    return layer, torch.randn(shape, dtype=torch.float64) * 2 + 0.5


def loss_of(layer):
    """``loss(params, x)``: a weighted sum of the outputs (every output matters, unequally)."""

    def loss(params, x):
        y = functional_call(layer, params, (x,))
        weights = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)
        return (y * weights).sum() + 0.1 * y.square().sum()

    return loss


def params_of(layer):
    return {k: v.detach().clone() for k, v in layer.named_parameters()}


@pytest.mark.parametrize("name", LAYERS)
def test_grad_matches_the_eager_backward(name):
    layer, x = make_layer(name)
    params = params_of(layer)
    loss = loss_of(layer)
    got_params, got_x = grad(loss, argnums=(0, 1))(params, x)

    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    x_leaf = x.clone().requires_grad_()
    want = torch.autograd.grad(loss(leaves, x_leaf), [*leaves.values(), x_leaf])
    for key, expected in zip(leaves, want):
        torch.testing.assert_close(got_params[key], expected)
    torch.testing.assert_close(got_x, want[-1])


@pytest.mark.parametrize("name", LAYERS)
def test_forward_mode_agrees_with_reverse_mode(name):
    layer, x = make_layer(name)
    params = params_of(layer)
    forward = jacfwd(loss_of(layer), argnums=1)(params, x)
    reverse = jacrev(loss_of(layer), argnums=1)(params, x)
    torch.testing.assert_close(forward, reverse)


@pytest.mark.parametrize("name", ["GroupNorm", "BatchNorm1d batch statistics", "weight_norm",
                                  "weight_standardization"])
def test_hessian_matches_double_backward(name):
    """Second derivatives through the transform equal the eager path's double backward."""
    layer, x = make_layer(name)
    params = params_of(layer)
    loss = loss_of(layer)
    got = hessian(loss, argnums=1)(params, x)
    want = torch.autograd.functional.hessian(lambda t: loss(params, t), x)
    torch.testing.assert_close(got, want)


def test_vmap_normalizes_each_batch_on_its_own():
    """BN with batch statistics, vmapped over a stack of batches, is BN of each batch:
    the same as a loop, and as torch's BatchNorm2d under the same vmap."""
    layer, _ = make_layer("BatchNorm2d batch statistics")
    batches = torch.randn(3, *X4, dtype=torch.float64) * 3 - 1
    params = params_of(layer)
    got = vmap(lambda b: functional_call(layer, params, (b,)))(batches)
    torch.testing.assert_close(got, torch.stack([layer(b) for b in batches]))

    reference = torch.nn.BatchNorm2d(4, track_running_stats=False).double()
    theirs = vmap(lambda b: functional_call(reference, params, (b,)))(batches)
    torch.testing.assert_close(got, theirs)


def test_per_sample_gradients_in_eval_mode():
    """The usual torch.func recipe (vmap of grad over single samples) on a network
    with BN in eval mode gives each sample's own gradient."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), bnlib.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net = net.double()
    net[1].running_mean.uniform_(-1, 1)
    net.eval()
    params = params_of(net)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 2, (7,))

    def sample_loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    for i in (0, 6):
        leaves = {k: v.requires_grad_() for k, v in params_of(net).items()}
        want = torch.autograd.grad(sample_loss(leaves, x[i], y[i]), list(leaves.values()))
        for key, expected in zip(leaves, want):
            torch.testing.assert_close(per_sample[key][i], expected)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
@pytest.mark.parametrize("cls", [bnlib.nn.BatchNorm1d, alternatives.BatchRenorm1d])
def test_running_estimates_under_a_transform_raise_before_any_change(cls, transform):
    layer = cls(3).double().train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(6, 3, dtype=torch.float64)
    params = params_of(layer)
    with pytest.raises(ValueError, match="use eval mode"):
        if transform == "grad":
            grad(lambda p: functional_call(layer, p, (x,)).sum())(params)
        else:
            vmap(lambda b: functional_call(layer, params, (b,)))(torch.stack([x, x]))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_switch_is_on_only_inside_a_transform():
    seen = []
    assert not bnF.under_func_transform()
    grad(lambda t: (seen.append(bnF.under_func_transform()), t.sum())[1])(torch.ones(2))
    vmap(lambda t: (seen.append(bnF.under_func_transform()), t)[1])(torch.ones(2))
    assert seen == [True, True] and not bnF.under_func_transform()


def test_functional_batch_norm_updates_running_estimates_under_grad():
    """As torch's F.batch_norm: the running estimates move as in an eager step."""
    x = torch.randn(8, 3, dtype=torch.float64) * 2 + 1
    weight = torch.rand(3, dtype=torch.float64) + 0.5
    eager_stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    func_stats = [t.clone() for t in eager_stats]

    def loss(w, stats):
        return bnF.batch_norm(x, *stats, w, None, training=True, momentum=0.3).square().mul(x).sum()

    got = grad(loss)(weight, func_stats)
    leaf = weight.clone().requires_grad_()
    want, = torch.autograd.grad(loss(leaf, eager_stats), leaf)
    torch.testing.assert_close(got, want)
    for ours, eager in zip(func_stats, eager_stats):
        torch.testing.assert_close(ours, eager)


def assert_step_under_grad_matches_eager(layer, x):
    """One training step of ``layer`` on ``x`` under ``grad`` and, on a copy,
    eagerly: the same parameter gradients, and the same buffers after it."""
    eager = copy.deepcopy(layer)
    got = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params_of(layer))
    eager(x).square().sum().backward()
    for key, param in eager.named_parameters():
        torch.testing.assert_close(got[key], param.grad)
    for key, buffer in eager.named_buffers():
        torch.testing.assert_close(layer.get_buffer(key), buffer)


def test_instance_norm_updates_running_estimates_under_grad():
    torch.manual_seed(0)
    layer = bnlib.nn.InstanceNorm1d(3, affine=True, track_running_stats=True).double()
    assert_step_under_grad_matches_eager(layer, torch.randn(4, 3, 5, dtype=torch.float64) * 3 + 2)


def test_spectral_norm_in_training_mode_under_grad():
    """The power iteration runs (and updates u, v) as in an eager training step."""
    torch.manual_seed(0)
    layer = alternatives.spectral_norm(torch.nn.Linear(4, 3)).double()
    assert_step_under_grad_matches_eager(layer, torch.randn(5, 4, dtype=torch.float64))


def test_an_ensemble_vmapped_over_its_stacked_buffers_trains_as_torch():
    """torch.func's ensembling recipe in training mode: each member normalizes its
    own batch and updates its own running estimates, as with torch's BatchNorm1d."""
    batches = torch.randn(3, 8, 4, dtype=torch.float64) * 2 + 1
    results = {}
    for cls in (bnlib.nn.BatchNorm1d, torch.nn.BatchNorm1d):
        torch.manual_seed(0)
        members = [cls(4, momentum=0.2).double() for _ in range(3)]
        params, buffers = torch.func.stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")
        y = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, batches)
        results[cls] = (y, buffers)
    (ours, our_buffers), (theirs, their_buffers) = results.values()
    torch.testing.assert_close(ours, theirs)
    for key, value in their_buffers.items():
        torch.testing.assert_close(our_buffers[key], value)
    assert our_buffers["num_batches_tracked"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("name", LAYERS)
def test_forward_ad_dual_numbers_agree_with_jvp(name):
    """torch.autograd.forward_ad (dual tensors, outside torch.func) gives the
    jvp that torch.func.jvp gives: the Functions have no jvp of their own, so
    an open dual level takes the formula path too."""
    import torch.autograd.forward_ad as fwAD

    layer, x = make_layer(name)
    tangent = torch.randn_like(x)
    expected = torch.func.jvp(lambda t: copy.deepcopy(layer)(t), (x,), (tangent,))[1]
    with fwAD.dual_level():
        got = fwAD.unpack_dual(copy.deepcopy(layer)(fwAD.make_dual(x, tangent))).tangent
    torch.testing.assert_close(got, expected)
    assert not bnF.under_func_transform()


def test_torch_utilities_find_bnlib_batch_norms():
    """torch finds batch norm layers with isinstance on its _BatchNorm: ours
    are instances (GhostBatchNorm, whose small batches are the point, is not).
    swa_utils.update_bn recomputes their running statistics as torch's."""
    torch_bn = torch.nn.modules.batchnorm._BatchNorm
    for layer in (bnlib.nn.BatchNorm1d(3), bnlib.nn.BatchNorm2d(3), bnlib.nn.BatchNorm3d(3), bnlib.nn.SyncBatchNorm(3)):
        assert isinstance(layer, torch_bn)
        assert len(list(layer.parameters())) == 2 and len(list(layer.buffers())) == 3
    assert not isinstance(bnlib.nn.GhostBatchNorm(3, 2), torch_bn)

    torch.manual_seed(0)
    batches = [torch.randn(16, 3) * 2 + 5 for _ in range(4)]
    models = [torch.nn.Sequential(torch.nn.Linear(3, 3), bn(3)) for bn in (bnlib.nn.BatchNorm1d, torch.nn.BatchNorm1d)]
    models[0][0].load_state_dict(models[1][0].state_dict())
    for model in models:
        torch.optim.swa_utils.update_bn(batches, model)
    ours, theirs = models[0][1], models[1][1]
    assert int(ours.num_batches_tracked) == 4 and ours.momentum == 0.1  # (update_bn sets None, then restores it)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    with pytest.raises(ValueError, match="2D or 3D"):  # torch's hook, which subclasses override
        bnlib.nn.BatchNorm1d(3)._check_input_dim(torch.ones(2, 3, 4, 5))


def test_replace_all_batch_norm_modules_then_vmap():
    """torch.func.replace_all_batch_norm_modules_ (no running statistics)
    reaches bnlib's layers, after which vmap over a batch works as torch's."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(3, 4), bn(4)) for bn in (bnlib.nn.BatchNorm1d, torch.nn.BatchNorm1d)]
    models[0][0].load_state_dict(models[1][0].state_dict())
    x = torch.randn(5, 8, 3)
    outs = []
    for model in models:
        torch.func.replace_all_batch_norm_modules_(model)
        assert model[1].running_mean is None and not model[1].track_running_stats
        outs.append(vmap(model)(x))
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("path", ["kernels", "tensor_ops"])
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (6, 3)], ids=["NCHW", "(N, C)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_gradients_match_torch(path, shape, dtype):
    """autograd.grad(..., is_grads_batched=True), which vectorized jacobians
    use, runs the backward on a batched dy: the tensor-op backward's flatten
    and in-place product had no batching rule (bfloat16 takes that path on
    the CPU by default)."""
    results = []
    for module in (torch.nn, bnlib.nn):
        torch.manual_seed(0)
        layer = (module.BatchNorm2d if len(shape) == 4 else module.BatchNorm1d)(3).to(dtype)
        x = torch.randn(*shape, dtype=dtype, requires_grad=True)
        with bnF.cpu_backend(path):
            y = layer(x)
            v = torch.randn((5,) + y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
            results.append(torch.autograd.grad(y, [x, layer.weight, layer.bias], v, is_grads_batched=True))
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace itself is deprecated
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks become constants: torch's too
@pytest.mark.parametrize("path", ["kernels", "tensor_ops"])
def test_jit_trace_updates_the_running_estimates_once(path):
    """torch.jit.trace records a Function and the ops inside its forward:
    a BN whose Function updates the estimates updated them twice per call
    of the traced module (momentum 0.5 gave 0.75). Tracing takes the
    formula path, so the trace is torch's: same estimates, same outputs."""
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    results = []
    with bnF.cpu_backend(path):
        for cls in (torch.nn.BatchNorm2d, bnlib.nn.BatchNorm2d):
            layer = cls(3, momentum=0.5)
            traced = torch.jit.trace(layer, x)  # check_trace on: the graphs agree
            layer.reset_running_stats()
            y = traced(2 * x + 1)
            results.append((y.detach(), layer.running_mean.clone(), layer.running_var.clone(),
                            int(layer.num_batches_tracked)))
    (y_t, mean_t, var_t, n_t), (y_b, mean_b, var_b, n_b) = results
    torch.testing.assert_close(y_b, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_b, mean_t)
    torch.testing.assert_close(var_b, var_t)
    assert n_b == n_t == 1
