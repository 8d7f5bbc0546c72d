"""bnlib.contrastive: per-device encoding, shuffle BN, InfoNCE and the retrieval checks.

The truth: torch's own ``F.batch_norm`` on each slice of rows, torch's
``log_softmax`` for the loss, and closed cases (an encoder that treats every
row on its own cannot depend on how rows are grouped).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import bnlib.nn
from bnlib import contrastive, data, models


def ghost(num_features, **kwargs):
    """Per-device BN as bnlib.contrastive expects it (encode sets the virtual batch size)."""
    return bnlib.nn.GhostBatchNorm(num_features, 1024, running_stats="first", **kwargs)


def encoder(norm="bn", seed=0):
    layer = ghost if norm == "bn" else bnlib.nn.LayerNorm
    return models.make_mlp(6, 16, 4, depth=2, activation="relu", norm_layer=layer, seed=seed)


def rows(n=24, seed=0):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * 2 + 1


def per_slice_bn(x, groups):
    """torch's BN in training mode on each group of rows of x, rows put back in place, unit length."""
    out = torch.empty_like(x)
    for g in groups:
        out[g] = F.batch_norm(x[g], None, None, training=True)
    return F.normalize(out, dim=1)


def test_encode_normalizes_each_device_with_its_own_rows():
    bn = torch.nn.Sequential(ghost(6, affine=False)).train()
    x = rows()
    got = contrastive.encode(bn, x, device_batch=4)
    torch.testing.assert_close(got, per_slice_bn(x, torch.arange(24).split(4)), rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(24))
    # one device holding everything is BN over the whole batch
    torch.testing.assert_close(contrastive.encode(bn, x, device_batch=24),
                               per_slice_bn(x, [torch.arange(24)]), rtol=1e-5, atol=1e-6)


def test_encode_with_an_order_regroups_the_rows_and_puts_them_back():
    bn = torch.nn.Sequential(ghost(6, affine=False)).train()
    x = rows()
    order = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    got = contrastive.encode(bn, x, device_batch=4, order=order)
    torch.testing.assert_close(got, per_slice_bn(x, order.split(4)), rtol=1e-5, atol=1e-6)
    # the grouping matters for BN: regrouped rows come out differently
    assert not torch.allclose(got, contrastive.encode(bn, x, device_batch=4), atol=1e-3)


def test_a_per_sample_encoder_does_not_see_the_grouping():
    ln = encoder("ln").train()
    x = rows()
    whole = contrastive.encode(ln, x)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(2))
    for got in (contrastive.encode(ln, x, device_batch=4), contrastive.encode(ln, x, device_batch=6, order=order)):
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)


def test_one_call_computes_what_the_devices_compute_on_their_slices():
    """The definition: each device runs the whole encoder (torch's BN layers) on its slice.
    Ghost layers in one call give the same rows, and the running estimates of the first
    device's BN layers (DDP keeps rank 0's), updated once."""
    net = encoder("bn", seed=1).train()
    x = rows(24, seed=3)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(5))
    got = contrastive.encode(net, x, device_batch=6, order=order)

    device = models.make_mlp(6, 16, 4, depth=2, activation="relu", norm_layer=torch.nn.BatchNorm1d, seed=1)
    device.load_state_dict(encoder("bn", seed=1).state_dict())
    first = copy.deepcopy(device).train()
    want = torch.empty(24, 4)
    for i, idx in enumerate(order.split(6)):
        want[idx] = (first if i == 0 else copy.deepcopy(device).train())(x[idx])
    torch.testing.assert_close(got, F.normalize(want, dim=1), rtol=1e-5, atol=1e-6)
    for name, tensor in first.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    assert net.norm1.virtual_batch_size == 1024   # the encoder's own size comes back


@pytest.mark.parametrize("layer", [bnlib.nn.BatchNorm1d, torch.nn.BatchNorm1d, bnlib.nn.BatchRenorm1d,
                                   models.ConstantStatsBatchNorm1d])
def test_a_layer_with_whole_batch_statistics_is_refused(layer):
    net = torch.nn.Sequential(ghost(6), layer(6)).train()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=f"layer '1' \\({layer.__name__}\\) would normalize .*GhostBatchNorm"):
        contrastive.encode(net, rows(), device_batch=4)
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert net[0].virtual_batch_size == 1024
    # in eval mode, with running estimates, it does not look at the batch
    net[1].eval()
    contrastive.encode(net, rows(), device_batch=4)


def test_which_layers_pass_the_check():
    # torch's BN in eval mode but without running estimates still uses the batch
    no_estimates = torch.nn.Sequential(ghost(6), torch.nn.BatchNorm1d(6, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="layer '1' \\(BatchNorm1d\\)"):
        contrastive.encode(no_estimates, rows(), device_batch=4)
    # a frozen BN and the per-row norms never look at the other rows, in any mode
    per_row = torch.nn.Sequential(bnlib.nn.FrozenBatchNorm(6), torch.nn.LayerNorm(6),
                                  torch.nn.GroupNorm(2, 6)).train()
    x = rows()
    torch.testing.assert_close(contrastive.encode(per_row, x, device_batch=4),
                               contrastive.encode(per_row, x), rtol=0, atol=0)


def test_nested_ghost_layers_of_different_sizes_are_all_set_and_restored():
    inner = torch.nn.Sequential(torch.nn.Linear(6, 6), bnlib.nn.GhostBatchNorm(6, 7, affine=False))
    net = torch.nn.Sequential(inner, torch.nn.Sequential(ghost(6, affine=False))).train()
    torch.nn.init.eye_(inner[0].weight)
    torch.nn.init.zeros_(inner[0].bias)
    x = rows()
    order = torch.randperm(24, generator=torch.Generator().manual_seed(6))
    # an identity layer, then BN twice on the same device: BN of BN of each slice
    want = torch.empty(24, 6)
    for idx in order.split(4):
        want[idx] = F.batch_norm(F.batch_norm(x[idx], None, None, training=True), None, None, training=True)
    torch.testing.assert_close(contrastive.encode(net, x, device_batch=4, order=order),
                               F.normalize(want, dim=1), rtol=1e-5, atol=1e-5)
    assert (inner[1].virtual_batch_size, net[1][0].virtual_batch_size) == (7, 1024)


def test_ghost_without_running_estimates_uses_each_device_in_eval_mode_too():
    net = torch.nn.Sequential(ghost(6, affine=False, track_running_stats=False)).eval()
    x = rows()
    torch.testing.assert_close(contrastive.encode(net, x, device_batch=4),
                               per_slice_bn(x, torch.arange(24).split(4)), rtol=1e-5, atol=1e-6)


def test_one_training_step_matches_devices_run_one_by_one():
    """train_contrastive's first SGD step against the same step computed by hand: the same
    draws, the encoder (torch's BN) run on each device's slice, torch's cross-entropy."""
    x = rows(40, seed=7)
    for shuffle in (False, True):
        net = encoder("bn", seed=2)
        contrastive.train_contrastive(net, x, steps=1, batch_size=16, device_batch=4,
                                      shuffle_keys=shuffle, noise=0.3, tau=0.5, lr=0.1, seed=9)

        device = models.make_mlp(6, 16, 4, depth=2, activation="relu", norm_layer=torch.nn.BatchNorm1d, seed=2)
        device.load_state_dict(encoder("bn", seed=2).state_dict())
        device.train()
        g = torch.Generator().manual_seed(9)
        batch = x[torch.randperm(40, generator=g)[:16]]
        queries = batch + 0.3 * torch.randn(batch.shape, generator=g)
        keys = batch + 0.3 * torch.randn(batch.shape, generator=g)
        order = torch.randperm(16, generator=g) if shuffle else torch.arange(16)

        def on_devices(inputs, rows_in_order):
            out = torch.empty(16, 4)
            for idx in rows_in_order.split(4):
                out[idx] = device(inputs[idx])
            return F.normalize(out, dim=1)

        q, k = on_devices(queries, torch.arange(16)), on_devices(keys, order)
        F.cross_entropy(q @ k.T / 0.5, torch.arange(16)).backward()
        with torch.no_grad():
            for p in device.parameters():
                p -= 0.1 * p.grad   # SGD's first step: the momentum buffer is the gradient
        for (name, got), want in zip(net.named_parameters(), device.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_device_batches_restores_the_sizes_when_the_encoder_raises():
    net = encoder("bn").train()
    with pytest.raises(RuntimeError):
        contrastive.encode(net, rows()[:, :5], device_batch=4)   # 5 features for 6
    assert [m.virtual_batch_size for m in (net.norm1, net.norm2)] == [1024, 1024]


def test_info_nce_is_cross_entropy_over_the_keys():
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    tau = 0.3
    logits = q @ k.T / tau
    want = -torch.log_softmax(logits, dim=1).diagonal().mean()
    torch.testing.assert_close(contrastive.info_nce(q, k, tau), want, rtol=1e-12, atol=0)
    # keys equal to their orthonormal queries, tau small: every row is sure of its key
    eye = torch.eye(4, dtype=torch.float64)
    assert contrastive.info_nce(eye, eye, 0.01) < 1e-30
    with pytest.raises(ValueError, match="tau must be > 0"):
        contrastive.info_nce(q, k, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        contrastive.info_nce(q, k[:4], tau)
    with pytest.raises(ValueError, match="B >= 1"):
        contrastive.info_nce(q[:0], k[:0], tau)


def test_positive_retrieval_keeps_modes_and_buffers_and_measures_what_it_says():
    x = rows(32)
    bn = encoder("bn")
    bn.eval()
    bn.norm1.train()   # a mixed state, which must come back as it was
    before = copy.deepcopy(bn.state_dict())
    modes = [m.training for m in bn.modules()]
    for kwargs in ({}, {"device_batch": 8}, {"device_batch": 8, "regroup": True}):
        value = contrastive.positive_retrieval(bn, x, **kwargs)
        assert 0 <= value <= 1
    assert [m.training for m in bn.modules()] == modes
    for name, tensor in bn.state_dict().items():
        assert torch.equal(tensor, before[name])
    # without noise every query is its own key
    assert contrastive.positive_retrieval(bn, x, noise=0.0) == 1.0
    # a per-sample encoder scores the same however the rows are grouped, in either mode
    ln = encoder("ln")
    scores = {contrastive.positive_retrieval(ln, x, **kwargs)
              for kwargs in ({}, {"device_batch": 8}, {"device_batch": 8, "regroup": True})}
    assert len(scores) == 1


def test_retrieval_accuracy_reads_rows_not_columns():
    # not symmetric: row 0's best key is its own (column 0), but column 0's best
    # query is row 1; rows 1 and 2 pick key 0
    q = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    k = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert contrastive.retrieval_accuracy(q, k) == pytest.approx(1 / 3)
    assert contrastive.retrieval_accuracy(torch.eye(3), torch.eye(3)) == 1.0
    with pytest.raises(ValueError, match="B >= 1"):
        contrastive.retrieval_accuracy(torch.zeros(0, 3), torch.zeros(0, 3))


@pytest.mark.parametrize("device_batch, regroup", [(None, False), (4, False), (4, True)])
def test_positive_retrieval_against_a_hand_computation(device_batch, regroup):
    """A trained-looking BN (running statistics far from the batch's), BN only: the score
    is argmax over keys of the queries' and keys' normalized views, computed by hand with
    torch's BN on the same noise, the same regrouping and the right mode."""
    bn = ghost(6, affine=False)
    bn.running_mean.fill_(3.0)
    bn.running_var.fill_(9.0)
    net = torch.nn.Sequential(bn)
    x = rows(32)
    got = contrastive.positive_retrieval(net, x, device_batch=device_batch, regroup=regroup, noise=0.5, seed=4)

    g = torch.Generator().manual_seed(4)
    queries, keys = contrastive.augment(x, 0.5, g), contrastive.augment(x, 0.5, g)
    if device_batch is None:
        def normalize(v, groups):
            return F.normalize(F.batch_norm(v, bn.running_mean, bn.running_var, training=False), dim=1)
        q, k = normalize(queries, None), normalize(keys, None)
    else:
        order = torch.randperm(32, generator=g) if regroup else torch.arange(32)
        q = per_slice_bn(queries, torch.arange(32).split(device_batch))
        k = per_slice_bn(keys, order.split(device_batch))
    want = float(((q @ k.T).argmax(dim=1) == torch.arange(32)).double().mean())
    assert got == want
    assert 0 < got < 1   # the noise makes some queries miss: the check has teeth
    if regroup:   # and the regrouping matters here, by over 20 points
        assert got < contrastive.positive_retrieval(net, x, device_batch=device_batch, noise=0.5, seed=4) - 0.2


def test_train_contrastive_regroups_only_the_keys(monkeypatch):
    x = rows(40)
    encode = contrastive.encode
    for shuffle in (False, True):
        calls = []

        def spy(encoder, inputs, device_batch=None, order=None):
            calls.append((device_batch, order))
            return encode(encoder, inputs, device_batch, order)

        monkeypatch.setattr(contrastive, "encode", spy)
        contrastive.train_contrastive(encoder("bn"), x, steps=3, batch_size=16, device_batch=4,
                                      shuffle_keys=shuffle, seed=0)
        assert len(calls) == 6 and all(b == 4 for b, _ in calls)
        queries, keys = calls[0::2], calls[1::2]
        assert all(order is None for _, order in queries)
        if shuffle:
            for _, order in keys:
                assert torch.equal(torch.sort(order).values, torch.arange(16))
            assert not all(torch.equal(order, torch.arange(16)) for _, order in keys)
        else:
            assert all(order is None for _, order in keys)


def test_dropout_inside_the_encoder_repeats_with_the_seed():
    def with_dropout():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), ghost(16), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.5), torch.nn.Linear(16, 4))

    x = rows(32)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        net = with_dropout()
        runs.append((contrastive.train_contrastive(net, x, steps=5, batch_size=16, device_batch=8, seed=3),
                     contrastive.positive_retrieval(net, x, device_batch=8, seed=3)))
    assert runs[0] == runs[1]
    # and the caller's random state is left alone
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    contrastive.train_contrastive(with_dropout(), x, steps=2, batch_size=16, device_batch=8, seed=3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), expected)


def test_train_contrastive_learns_and_repeats_itself():
    split = data.load_digits_split()
    x = split.x_train[:, :6].contiguous()
    for shuffle in (False, True):
        net = encoder("bn", seed=0)
        losses = contrastive.train_contrastive(net, x, steps=60, batch_size=32, device_batch=8,
                                               shuffle_keys=shuffle, seed=0)
        assert len(losses) == 60 and net.training
        assert sum(losses[-10:]) < sum(losses[:10])
        again = encoder("bn", seed=0)
        assert contrastive.train_contrastive(again, x, steps=60, batch_size=32, device_batch=8,
                                             shuffle_keys=shuffle, seed=0) == losses


def test_nearest_neighbour_accuracy():
    x, y = data.gaussian_blobs(60, n_features=6, n_classes=3, spread=0.3, seed=0)
    net = encoder("ln")
    # test rows that are training rows find themselves
    assert contrastive.nearest_neighbour_accuracy(net, x, y, x[:20], y[:20]) == 1.0
    assert net.training
    with pytest.raises(ValueError, match="one label per row"):
        contrastive.nearest_neighbour_accuracy(net, x, y[:-1], x, y)


@pytest.mark.parametrize("call, match", [
    (lambda net, x: contrastive.encode(net, x, device_batch=5), "divide the 24 rows"),
    (lambda net, x: contrastive.encode(net, x, device_batch=1), "integer >= 2"),
    (lambda net, x: contrastive.encode(net, x, order=torch.arange(24)), "needs device_batch"),
    (lambda net, x: contrastive.encode(net, x, device_batch=4, order=torch.zeros(24)), "permutation"),
    (lambda net, x: contrastive.encode(net, x[0]), "2-D tensor"),
    (lambda net, x: contrastive.positive_retrieval(net, x, regroup=True), "needs device_batch"),
    (lambda net, x: contrastive.train_contrastive(net, x, steps=1, batch_size=8, device_batch=None),
     "device_batch is required"),
    (lambda net, x: contrastive.train_contrastive(net, x, steps=1, batch_size=25, device_batch=5),
     "at most the 24 rows"),
    (lambda net, x: contrastive.train_contrastive(net, x, steps=-1, batch_size=8, device_batch=4),
     "steps must be an integer >= 0"),
    (lambda net, x: contrastive.train_contrastive(net, x, steps=1, batch_size=8, device_batch=4, tau=0),
     "tau and lr > 0"),
])
def test_bad_input_raises_before_anything_changes(call, match):
    net = encoder("bn")
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=match):
        call(net, rows())
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_positive_retrieval_and_encode_check_their_arguments():
    encoder = models.make_mlp(8, 16, 4, depth=1, seed=0)
    x = torch.randn(16, 8)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        contrastive.positive_retrieval(encoder, x, device_batch=4, noise=float("nan"))
    for order in (list(range(16)), torch.arange(16).float() + 0.5):
        with pytest.raises(ValueError, match="order must be an integer tensor"):
            contrastive.encode(encoder, x, 4, order=order)
