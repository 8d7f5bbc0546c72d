"""Conditional batch norm and AdaIN (bnlib.reference, bnlib.conditional) against independent truths.

The truths: central finite differences in float64 for the NumPy backward;
torch's ``F.batch_norm`` without affine step, times the class rows written
out by hand, for the module (forward, autograd of that expression for the
gradients, torch's running statistics); the formula of AdaIN written out in
float64. Tolerances are tests/helpers.py's (float64: a few ulps of another
order of operations); finite differences get 1e-6, their truncation error
at h = 1e-6 on inputs of order 1.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnlib.nn
from bnlib import cvae, reference
from bnlib.conditional import adaptive_instance_norm
from bnlib.data import load_digits_split

from helpers import GRAD_TOL, OUT_TOL, STAT_TOL, assert_close

SHAPES = {1: (7, 3), 2: (6, 3, 4), 3: (5, 3, 2, 3), 4: (4, 3, 2, 2, 3)}
MODULES = {1: bnlib.nn.ConditionalBatchNorm1d, 2: bnlib.nn.ConditionalBatchNorm1d,
           3: bnlib.nn.ConditionalBatchNorm2d, 4: bnlib.nn.ConditionalBatchNorm3d}
NUM_CLASSES = 4


def _labels(n, seed=0):
    return torch.randint(NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


def _tables(channels, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return 1 + 0.5 * rng.standard_normal((NUM_CLASSES, channels)), rng.standard_normal((NUM_CLASSES, channels))


def _per_sample(table, labels, ndim):
    rows = table[labels]
    return rows.reshape(rows.shape + (1,) * (ndim - 2))


# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", SHAPES)
def test_reference_forward_is_bn_then_the_class_rows(key):
    rng = np.random.default_rng(1)
    x = 2 + 3 * rng.standard_normal(SHAPES[key])
    labels = _labels(x.shape[0]).numpy()
    gamma, beta = _tables(x.shape[1])
    y, _ = reference.conditional_batchnorm_forward(x, labels, gamma, beta)
    axes = (0,) + tuple(range(2, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    x_hat = (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + 1e-5)
    want = _per_sample(gamma, labels, x.ndim) * x_hat + _per_sample(beta, labels, x.ndim)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", [1, 3])
def test_reference_backward_matches_finite_differences(key):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(SHAPES[key])
    labels = np.array([0, 2, 2, 1, 0, 2, 0][: x.shape[0]])  # class 3 absent: its rows get zero gradient
    gamma, beta = _tables(x.shape[1])
    dy = rng.standard_normal(x.shape)
    _, cache = reference.conditional_batchnorm_forward(x, labels, gamma, beta)
    dx, dgamma, dbeta = reference.conditional_batchnorm_backward(dy, cache)

    def loss(x, gamma, beta):
        return float((reference.conditional_batchnorm_forward(x, labels, gamma, beta)[0] * dy).sum())

    h = 1e-6
    for name, value, grad in (("x", x, dx), ("gamma", gamma, dgamma), ("beta", beta, dbeta)):
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            args = {"x": x, "gamma": gamma, "beta": beta}
            up, down = value.copy(), value.copy()
            up[idx] += h
            down[idx] -= h
            numeric[idx] = (loss(**{**args, name: up}) - loss(**{**args, name: down})) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6, err_msg=name)
    assert not dgamma[3].any() and not dbeta[3].any()


def test_reference_one_class_is_plain_batchnorm():
    """With every sample in class k, it is batch norm with gamma[k] and beta[k], gradients too."""
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((6, 3, 4)), rng.standard_normal((6, 3, 4))
    gamma, beta = _tables(3)
    labels = np.full(6, 2)
    y, cache = reference.conditional_batchnorm_forward(x, labels, gamma, beta)
    y_bn, cache_bn = reference.batchnorm_forward(x, gamma[2], beta[2])
    np.testing.assert_allclose(y, y_bn, rtol=1e-13, atol=1e-13)
    dx, dgamma, dbeta = reference.conditional_batchnorm_backward(dy, cache)
    dx_bn, dgamma_bn, dbeta_bn = reference.batchnorm_backward(dy, cache_bn)
    np.testing.assert_allclose(dx, dx_bn, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dgamma[2], dgamma_bn, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dbeta[2], dbeta_bn, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("labels, match", [
    (np.array([0.0, 1.0, 1.0]), "integer class labels"),
    (np.array([[0], [1], [1]]), r"one label per sample, shape \(3,\)"),
    (np.array([0, 1]), r"shape \(3,\)"),
    (np.array([0, 4, 1]), r"labels in \[0, 4\)"),
    (np.array([0, -1, 1]), r"labels in \[0, 4\)"),
])
def test_reference_bad_labels(labels, match):
    gamma, beta = _tables(2)
    with pytest.raises(ValueError, match=match):
        reference.conditional_batchnorm_forward(np.ones((3, 2)), labels, gamma, beta)


def test_reference_bad_tables():
    gamma, beta = _tables(2)
    with pytest.raises(ValueError, match=r"shape \(K, 3\)"):
        reference.conditional_batchnorm_forward(np.ones((3, 3)), np.zeros(3, int), gamma, beta)
    with pytest.raises(ValueError, match="same shape|both have shape"):
        reference.conditional_batchnorm_forward(np.ones((3, 2)), np.zeros(3, int), gamma, beta[:2])


# --------------------------------------------------------------------------
# The torch module
# --------------------------------------------------------------------------


def _module(key, dtype=torch.float64, **kwargs):
    layer = MODULES[key](SHAPES[key][1], NUM_CLASSES, dtype=dtype, **kwargs)
    gamma, beta = _tables(SHAPES[key][1])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(gamma))
        layer.bias.copy_(torch.as_tensor(beta))
    return layer


def _truth(x, labels, weight, bias, running_mean, running_var, training, momentum=0.1):
    """torch's batch norm without affine step, then each sample's class row: by hand."""
    x_hat = F.batch_norm(x, running_mean, running_var, None, None, training, momentum, 1e-5)
    return _per_sample(weight, labels, x.dim()) * x_hat + _per_sample(bias, labels, x.dim())


@pytest.mark.parametrize("key", SHAPES)
def test_module_train_and_eval_match_torch(key):
    layer = _module(key)
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    running_mean, running_var = torch.zeros(SHAPES[key][1], dtype=torch.float64), torch.ones(
        SHAPES[key][1], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    for step in range(3):  # training: output, gradients, running statistics
        x = (1 + 2 * torch.randn(SHAPES[key], generator=g, dtype=torch.float64)).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        labels = _labels(x.shape[0], seed=step)
        y = layer(x, labels)
        want = _truth(x_ref, labels, weight, bias, running_mean, running_var, True)
        assert_close(y, want, OUT_TOL[torch.float64], "y")
        dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        layer.zero_grad()
        weight.grad = bias.grad = None
        y.backward(dy)
        want.backward(dy)
        assert_close(x.grad, x_ref.grad, GRAD_TOL[torch.float64], "dx")
        assert_close(layer.weight.grad, weight.grad, GRAD_TOL[torch.float64], "dweight")
        assert_close(layer.bias.grad, bias.grad, GRAD_TOL[torch.float64], "dbias")
        assert_close(layer.norm.running_mean, running_mean, STAT_TOL[torch.float64], "running_mean")
        assert_close(layer.norm.running_var, running_var, STAT_TOL[torch.float64], "running_var")
    assert int(layer.norm.num_batches_tracked) == 3
    layer.eval()  # eval: the running statistics, nothing updated
    x = torch.randn(SHAPES[key], generator=g, dtype=torch.float64)
    labels = _labels(x.shape[0], seed=9)
    with torch.no_grad():
        assert_close(layer(x, labels), _truth(x, labels, weight, bias, running_mean, running_var, False),
                     OUT_TOL[torch.float64], "eval y")
    assert int(layer.norm.num_batches_tracked) == 3


def test_module_matches_the_numpy_reference():
    layer = _module(3)
    x = torch.randn(SHAPES[3], dtype=torch.float64, generator=torch.Generator().manual_seed(5),
                    requires_grad=True)
    labels = _labels(x.shape[0])
    y = layer(x, labels)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, cache = reference.conditional_batchnorm_forward(x.detach().numpy(), labels.numpy(),
                                                           *_tables(x.shape[1]))
    dx, dgamma, dbeta = reference.conditional_batchnorm_backward(dy.numpy(), cache)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(layer.weight.grad.numpy(), dgamma, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(layer.bias.grad.numpy(), dbeta, rtol=1e-9, atol=1e-11)


def test_module_parameters_state_dict_and_repr():
    layer = bnlib.nn.ConditionalBatchNorm2d(5, 3, momentum=None)
    assert layer.weight.shape == layer.bias.shape == (3, 5)
    assert torch.equal(layer.weight, torch.ones(3, 5)) and torch.equal(layer.bias, torch.zeros(3, 5))
    assert sorted(layer.state_dict()) == ["bias", "norm.num_batches_tracked", "norm.running_mean",
                                          "norm.running_var", "weight"]
    assert layer.num_features == 5 and layer.norm.affine is False and layer.norm.momentum is None
    assert "5, num_classes=3" in repr(layer)
    plain = bnlib.nn.ConditionalBatchNorm1d(4, 2, track_running_stats=False)
    assert plain.norm.running_mean is None
    x = torch.randn(6, 4)
    with torch.no_grad():
        assert_close(plain.eval()(x, torch.zeros(6, dtype=torch.long)), F.batch_norm(x, None, None, training=True),
                     OUT_TOL[torch.float32], "batch statistics in eval mode without running estimates")


def test_low_precision_input_keeps_its_dtype():
    layer = bnlib.nn.ConditionalBatchNorm2d(3, NUM_CLASSES)
    x = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
    y = layer(x, _labels(4))
    assert y.dtype == torch.bfloat16
    want = F.batch_norm(x.float(), None, None, training=True)
    assert_close(y.float(), want, dict(rtol=2e-2, atol=2e-2), "bfloat16 output")


BAD_LABELS = [
    (torch.tensor([0.0, 1.0, 1.0, 2.0]), "integer class labels"),
    (torch.tensor([True, False, True, True]), "integer class labels"),
    (torch.tensor([0, 1, 1]), r"one label per sample, shape \(4,\)"),
    (torch.tensor([[0, 1, 1, 2]]), r"shape \(4,\)"),
    (torch.tensor([0, 1, 4, 2]), r"labels in \[0, 4\)"),
    (torch.tensor([0, -1, 1, 2]), r"labels in \[0, 4\)"),
    ([0, 1, 1, 2], "as a tensor"),
]


@pytest.mark.parametrize("labels, match", BAD_LABELS)
def test_bad_labels_raise_and_change_nothing(labels, match):
    layer = bnlib.nn.ConditionalBatchNorm1d(3, NUM_CLASSES)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(4, 3), labels)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("shape, match", [
    ((4, 5), "expected input with 3 channels"),
    ((4, 3, 2, 2), "expected 2D or 3D input"),
    ((1, 3), "more than 1 value per channel"),
])
def test_bad_input_raises_and_changes_nothing(shape, match):
    layer = bnlib.nn.ConditionalBatchNorm1d(3, NUM_CLASSES)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(shape), torch.zeros(shape[0], dtype=torch.long))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True, None])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        bnlib.nn.ConditionalBatchNorm1d(3, num_classes)


def test_uint8_labels_are_class_indices_not_a_mask():
    """torch indexes with a uint8 tensor as with a boolean mask: the layer must not."""
    layer = _module(1, dtype=torch.float32)
    x = torch.randn(4, 3)
    for labels in ([0, 1, 2, 3], [1, 1, 1, 1]):
        got = layer(x, torch.tensor(labels, dtype=torch.uint8))
        assert_close(got, layer(x, torch.tensor(labels)), OUT_TOL[torch.float32], f"uint8 {labels}")


def test_reset_and_numpy_num_classes():
    layer = _module(3, dtype=torch.float32, momentum=0.5)
    layer(torch.randn(SHAPES[3]), _labels(SHAPES[3][0]))
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(NUM_CLASSES, 3)) and torch.equal(layer.bias, torch.zeros(NUM_CLASSES, 3))
    assert torch.equal(layer.norm.running_mean, torch.zeros(3)) and int(layer.norm.num_batches_tracked) == 0
    assert bnlib.nn.ConditionalBatchNorm1d(3, np.int64(5)).num_classes == 5


def test_low_precision_input_with_class_tables():
    layer = _module(3, dtype=torch.float32)
    x, labels = torch.randn(SHAPES[3]), _labels(SHAPES[3][0])
    with torch.no_grad():
        want = layer(x, labels)
        got = layer(x.to(torch.bfloat16), labels)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), want, dict(rtol=3e-2, atol=3e-2), "bfloat16 with class rows")


def test_error_names_the_conditional_layer():
    with pytest.raises(ValueError, match="ConditionalBatchNorm2d expected input with 3 channels"):
        bnlib.nn.ConditionalBatchNorm2d(3, NUM_CLASSES)(torch.randn(2, 4, 3, 3), torch.zeros(2, dtype=torch.long))


def test_weight_decay_spares_the_class_tables_with_decay_bn_false():
    from bnlib import training

    model = torch.nn.ModuleDict({"fc": torch.nn.Linear(3, 3), "cbn": bnlib.nn.ConditionalBatchNorm1d(3, 2)})
    groups = training._parameter_groups(model, 0.1, decay_bn=False)
    undecayed = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    assert undecayed == {id(model["cbn"].weight), id(model["cbn"].bias)}


def test_empty_batch_gives_empty_output_and_keeps_the_estimates():
    layer = bnlib.nn.ConditionalBatchNorm2d(3, NUM_CLASSES)
    y = layer(torch.randn(0, 3, 2, 2), torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 3, 2, 2)
    assert torch.equal(layer.norm.running_mean, torch.zeros(3))


@pytest.mark.parametrize("convert", ["bnlib sync", "torch sync", "frozen"])
def test_conversions_reach_the_inner_batchnorm_and_forward_still_works(convert):
    """The swapped inner layer normalizes; the class rows are applied as before."""
    layer = _module(3, dtype=torch.float32)
    layer(torch.randn(SHAPES[3]), _labels(SHAPES[3][0]))  # running estimates away from 0 and 1
    model = torch.nn.ModuleDict({"cbn": layer})
    x, labels = torch.randn(SHAPES[3]), _labels(SHAPES[3][0], seed=3)
    with torch.no_grad():
        want = model.eval()["cbn"](x, labels)
    converters = {"bnlib sync": bnlib.nn.SyncBatchNorm.convert_sync_batchnorm,
                  "torch sync": torch.nn.SyncBatchNorm.convert_sync_batchnorm,
                  "frozen": bnlib.nn.FrozenBatchNorm.convert_frozen_batchnorm}
    kinds = {"bnlib sync": bnlib.nn.SyncBatchNorm, "torch sync": torch.nn.SyncBatchNorm,
             "frozen": bnlib.nn.FrozenBatchNorm}
    converted = converters[convert](model)["cbn"]
    assert isinstance(converted.norm, kinds[convert]) and converted.weight.shape == (NUM_CLASSES, 3)
    with torch.no_grad():
        assert_close(converted.eval()(x, labels), want, OUT_TOL[torch.float32], convert)
        with pytest.raises(ValueError, match="ConditionalBatchNorm2d expected labels in"):
            converted(x, labels + NUM_CLASSES)


# --------------------------------------------------------------------------
# AdaIN
# --------------------------------------------------------------------------


def _adain_by_hand(content, style, eps=1e-5):
    dims = tuple(range(2, content.dim()))
    mu_c, mu_s = content.mean(dims, keepdim=True), style.mean(dims, keepdim=True)
    sigma_c = (content.var(dims, unbiased=False, keepdim=True) + eps).sqrt()
    sigma_s = (style.var(dims, unbiased=False, keepdim=True) + eps).sqrt()
    return sigma_s * (content - mu_c) / sigma_c + mu_s


@pytest.mark.parametrize("content_shape, style_shape", [
    ((3, 4, 5, 5), (3, 4, 7, 6)),
    ((3, 4, 6), (1, 4, 9)),
    ((2, 2, 3, 2, 2), (2, 2, 2, 2, 2)),
])
def test_adain_matches_the_formula(content_shape, style_shape):
    g = torch.Generator().manual_seed(6)
    content = (1 + 2 * torch.randn(content_shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    style = (-3 + 0.5 * torch.randn(style_shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = adaptive_instance_norm(content, style)
    want = _adain_by_hand(content, style)
    assert_close(y, want, OUT_TOL[torch.float64], "AdaIN")
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, (content, style), dy)
    grads_want = torch.autograd.grad(want, (content, style), dy)
    for name, got, expected in zip(("dcontent", "dstyle"), grads, grads_want):
        assert_close(got, expected, GRAD_TOL[torch.float64], name)


def test_adain_gives_the_content_the_styles_statistics():
    g = torch.Generator().manual_seed(7)
    content = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    style = 5 + 3 * torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    y = adaptive_instance_norm(content, style)
    assert_close(y.mean((2, 3)), style.mean((2, 3)), dict(rtol=1e-12, atol=1e-12), "means")
    # each std is sqrt(var + eps): the ratio var_y / var_s is (var_s + eps) / var_s * var_c / (var_c + eps)
    assert_close(y.std((2, 3), unbiased=False), style.std((2, 3), unbiased=False), dict(rtol=1e-5, atol=0),
                 "standard deviations")


def test_adain_half_precision_with_a_wide_style():
    """A style spread of 300 squared overflows float16: the statistics are taken in float32."""
    g = torch.Generator().manual_seed(8)
    content = torch.randn(2, 3, 6, 6, generator=g)
    style = 300 * torch.randn(2, 3, 6, 6, generator=g)
    want = adaptive_instance_norm(content.double(), style.double())
    for dtype in (torch.float16, torch.bfloat16):
        got = adaptive_instance_norm(content.to(dtype), style.to(dtype))
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert_close(got.double(), want, dict(rtol=2e-2, atol=0.02 * 300), str(dtype))
    assert adaptive_instance_norm(content.half(), style).dtype == torch.float16  # the content's dtype


@pytest.mark.parametrize("content_shape, style_shape, eps, match", [
    ((2, 3, 4, 4), (2, 3, 4), 1e-5, "same number of dimensions"),
    ((2, 3), (2, 3), 1e-5, "at least 3"),
    ((2, 3, 4, 4), (2, 2, 4, 4), 1e-5, r"\(1, C, ...\)"),
    ((2, 3, 4, 4), (3, 3, 4, 4), 1e-5, r"N = 2, C = 3"),
    ((2, 3, 4, 4), (2, 3, 1, 1), 1e-5, "more than 1 spatial value"),
    ((2, 3, 4, 4), (2, 3, 4, 4), 0.0, "eps must be"),
])
def test_adain_bad_input(content_shape, style_shape, eps, match):
    with pytest.raises(ValueError, match=match):
        adaptive_instance_norm(torch.randn(content_shape), torch.randn(style_shape), eps=eps)


# --------------------------------------------------------------------------
# The chapter's experiment: a conditional VAE
# --------------------------------------------------------------------------


def test_digit_pixels_are_the_standardized_splits_images():
    pixels, standardized = cvae.load_digit_pixels(), load_digits_split()
    assert torch.equal(pixels.y_train, standardized.y_train) and torch.equal(pixels.y_test, standardized.y_test)
    assert 0 <= float(pixels.x_train.min()) and float(pixels.x_train.max()) <= 1
    # standardizing the pixels with the training split's statistics gives the standardized split
    x = pixels.x_train.double()
    std = x.std(0, unbiased=False)
    std[std == 0] = 1
    assert_close(((x - x.mean(0)) / std).float(), standardized.x_train, dict(rtol=1e-4, atol=1e-4), "x")


def test_negative_elbo_by_hand():
    torch.manual_seed(0)
    encoder, decoder = cvae.Encoder(2, 6).eval(), cvae.Decoder(2, 6, "bn").eval()
    x, labels, noise = torch.rand(5, 64), torch.tensor([0, 1, 2, 3, 9]), torch.randn(5, 2)
    reconstruction, kl = cvae.negative_elbo(encoder, decoder, x, labels, noise)
    mu, log_var = encoder(x)
    p = torch.sigmoid(decoder(mu + (0.5 * log_var).exp() * noise, labels))
    want_reconstruction = -(x * p.log() + (1 - x) * (1 - p).log()).sum(1).mean()
    q = torch.distributions.Normal(mu, (0.5 * log_var).exp())
    want_kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert_close(reconstruction, want_reconstruction, dict(rtol=1e-5, atol=1e-5), "reconstruction")
    assert_close(kl, want_kl, dict(rtol=1e-5, atol=1e-6), "kl")


@pytest.mark.parametrize("condition", cvae.CONDITIONS)
def test_where_the_label_enters(condition):
    torch.manual_seed(1)
    decoder = cvae.Decoder(3, 8, condition)
    with torch.no_grad():  # class rows apart, so that a label would show
        for p in decoder.parameters():
            p.add_(torch.randn_like(p))
    z = torch.randn(4, 3)
    a = cvae.generate(decoder, z, torch.tensor([0, 1, 2, 3]))
    b = cvae.generate(decoder, z, torch.tensor([5, 6, 7, 8]))
    assert decoder.training  # generate restores the mode
    assert torch.equal(a, b) == (condition is None)
    assert (decoder.fc1.in_features == 13) == (condition == "input")
    conditional = [isinstance(n, bnlib.nn.ConditionalBatchNorm1d) for n in (decoder.norm1, decoder.norm2)]
    assert conditional == [condition == "bn"] * 2  # the label in both BN layers


def test_one_class_batches_are_one_batch_per_class():
    torch.manual_seed(2)
    decoder = cvae.Decoder(3, 8, "bn")
    z = torch.randn(5, 3)
    images = cvae.one_class_batches(decoder, z)
    assert images.shape == (10, 5, 64)
    for k in (0, 7):
        want = torch.sigmoid(copy.deepcopy(decoder).train()(z, torch.full((5,), k)))
        assert_close(images[k], want, OUT_TOL[torch.float32], f"class {k}")
    assert decoder.training and int(decoder.norm1.norm.num_batches_tracked) == 0


def test_decoder_rejects_an_unknown_condition():
    with pytest.raises(ValueError, match="condition must be one of"):
        cvae.Decoder(2, 4, "film")


def test_train_cvae_is_reproducible_and_learns():
    pixels = cvae.load_digit_pixels()
    small = pixels._replace(x_train=pixels.x_train[:256], y_train=pixels.y_train[:256])
    runs = [cvae.train_cvae(small, "bn", latent=2, hidden=16, epochs=3, seed=0) for _ in range(2)]
    assert runs[0].train_reconstruction == runs[1].train_reconstruction
    assert not runs[0].decoder.training and not runs[0].encoder.training
    start = cvae.train_cvae(small, "bn", latent=2, hidden=16, epochs=1, lr=0.0, seed=0)
    assert runs[0].train_reconstruction < start.train_reconstruction
    rec, kl = cvae.evaluate_cvae(runs[0], pixels.x_test, pixels.y_test)
    assert rec > 0 and kl >= 0
    runs[0].decoder.train()  # evaluated in eval mode all the same, and left in its mode
    counted = int(runs[0].decoder.norm1.norm.num_batches_tracked)
    assert cvae.evaluate_cvae(runs[0], pixels.x_test, pixels.y_test) == (rec, kl)
    assert runs[0].decoder.training and int(runs[0].decoder.norm1.norm.num_batches_tracked) == counted


def test_train_cvae_keeps_the_callers_random_state_and_checks_epochs():
    pixels = cvae.load_digit_pixels()
    small = pixels._replace(x_train=pixels.x_train[:64], y_train=pixels.y_train[:64])
    state = torch.get_rng_state()
    cvae.train_cvae(small, "bn", latent=2, hidden=8, epochs=1, batch_size=16, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    for epochs in (0, -1, 1.5):
        with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
            cvae.train_cvae(small, "bn", latent=2, hidden=8, epochs=epochs)


def test_generate_keeps_each_submodules_mode():
    """A BN layer the caller froze in eval mode inside a decoder in training
    mode stays frozen (decoder.train(was_training) unfroze it)."""
    decoder = cvae.Decoder(2, 8, "bn")
    decoder.train()
    decoder.norm1.eval()
    cvae.generate(decoder, torch.randn(4, 2), torch.arange(4))
    assert decoder.training and not decoder.norm1.training
