"""bnlib.experiments: seed statistics, steps to a target, the recording callbacks, the runners.

Truths: NumPy (mean, std, percentile), hand-written histories, a forward pass
written out layer by layer (BN by its four formulas), counting, and
``bnlib.training.evaluate``. Everything runs on tiny data in a few seconds.
"""

import copy
import math

import numpy as np
import pytest
import torch

import bnlib.moving_average
import bnlib.nn
from bnlib import data, experiments as ex, models, training
from bnlib.data import Split


def blobs_split(n_train=96, n_test=48, seed=0):
    """A small, easy 3-class problem in 6 dimensions, as a Split."""
    x, y = data.gaussian_blobs(n_train + n_test, n_features=6, n_classes=3, spread=0.7, seed=seed)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


# --------------------------------------------------------------------------
# run_seeds, seed_values
# --------------------------------------------------------------------------


def test_run_seeds_matches_numpy_for_scalars():
    # A deterministic fn of the seed: the statistics must be NumPy's, to rounding (1e-12).
    fn = lambda s: math.sin(s) + 0.1 * s**2  # noqa: E731
    seeds = [0, 1, 5, 7]
    values = np.array([fn(s) for s in seeds])
    mean, std = ex.run_seeds(fn, seeds)
    assert isinstance(mean, float) and isinstance(std, float)
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert std == pytest.approx(values.std(ddof=0), rel=1e-12)


def test_run_seeds_matches_numpy_elementwise_for_arrays():
    fn = lambda s: (s, 2.0 * s + 1, s**3)  # noqa: E731
    seeds = range(4)
    values = np.array([fn(s) for s in seeds], dtype=float)
    mean, std = ex.run_seeds(fn, seeds)
    np.testing.assert_allclose(mean, values.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, values.std(axis=0), rtol=1e-12)
    assert ex.seed_values(fn, seeds).shape == (4, 3)


def test_run_seeds_one_seed_and_no_seed():
    assert ex.run_seeds(lambda s: 3.0, [11]) == (3.0, 0.0)
    with pytest.raises(ValueError, match="seeds is empty"):
        ex.run_seeds(lambda s: 1.0, [])


# --------------------------------------------------------------------------
# steps_to_accuracy
# --------------------------------------------------------------------------


def test_steps_to_accuracy_on_a_synthetic_history():
    h = training.History(step=[0, 10, 20, 30, 40], loss=[0] * 5, accuracy=[0.1, 0.5, 0.95, 0.9, 0.97])
    assert ex.steps_to_accuracy(h, 0.9) == 20  # the first crossing, not a later one
    assert ex.steps_to_accuracy(h, 0.95) == 20  # ">=": reaching the target exactly counts
    assert ex.steps_to_accuracy(h, 0.96) == 40
    assert ex.steps_to_accuracy(h, 0.05) == 0
    assert ex.steps_to_accuracy(h, 0.99) is None


def test_steps_to_accuracy_rejects_mismatched_lists():
    h = training.History(step=[1, 2, 3], loss=[0, 0, 0], accuracy=[0.5, 0.6])
    with pytest.raises(ValueError, match="differ in length"):
        ex.steps_to_accuracy(h, 0.5)


# --------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------


def _bn_by_hand(z, norm):
    """Training-mode BN from its four formulas (biased variance), float64."""
    z = z.double()
    mu = z.mean(dim=0)
    var = ((z - mu) ** 2).mean(dim=0)
    x_hat = (z - mu) / torch.sqrt(var + norm.eps)
    return norm.weight.detach().double() * x_hat + norm.bias.detach().double()


@pytest.mark.parametrize("norm", [None, "bn"])
def test_unit_percentiles_match_numpy_on_a_hand_forward(norm):
    # The last hidden layer's sigmoid input, computed layer by layer in
    # float64, then np.percentile: agreement to float32 rounding (1e-5).
    torch.manual_seed(0)
    model = models.make_mlp(6, [8, 5], 3, activation="sigmoid", norm=norm, seed=1)
    with torch.no_grad():  # non-trivial gamma and beta
        for m in models.get_layers(model, "norm"):
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-1.0, 1.0)
    x = torch.randn(40, 6)
    buffers = [b.clone() for b in model.buffers()]
    rec = ex.UnitPercentiles(x, layer=-1, unit=3, every=5)
    for step in range(11):
        rec(step, model)
    assert rec.steps == [0, 5, 10]
    assert rec.values.shape == (3, 3)

    a = x.double()
    fcs, norms = models.get_layers(model, "fc"), models.get_layers(model, "norm")
    for l, fc in enumerate(fcs):
        z = a @ fc.weight.detach().double().T
        if fc.bias is not None:
            z = z + fc.bias.detach().double()
        u = _bn_by_hand(z, norms[l]) if norms else z
        a = torch.sigmoid(u)
    expected = np.percentile(u[:, 3].numpy(), [15, 50, 85])
    np.testing.assert_allclose(rec.values[0], expected, rtol=1e-5, atol=1e-5)
    # probing changes no buffer (running statistics, num_batches_tracked)
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers))


def test_eval_curve_records_every_k_steps_from_step_0():
    split = blobs_split()
    model = models.make_mlp(6, 16, 3, depth=2, norm="bn", seed=0)
    curve = ex.EvalCurve(split.x_test, split.y_test, every=4)
    training.train(model, split.x_train, split.y_train, steps=10, batch_size=16, callback=curve)
    assert curve.history.step == [0, 4, 8]
    assert len(curve.history.accuracy) == len(curve.history.loss) == 3
    with pytest.raises(ValueError, match="every"):
        ex.EvalCurve(split.x_test, split.y_test, every=0)


# --------------------------------------------------------------------------
# Models, one run
# --------------------------------------------------------------------------


def test_weight_rows_norms_and_angles_on_known_changes():
    """Scaling the rows changes their norm, not their angle; turning every
    row by a known angle in a plane gives that angle."""
    model = models.make_mlp(6, 5, 3, depth=2, activation="relu", norm="bn", seed=0)
    rows = ex.WeightRows()
    fc = models.get_layers(model, "fc")
    truth = float(torch.cat([layer.weight.detach().double().norm(dim=1) for layer in fc]).mean())
    rows(0, model)
    with torch.no_grad():
        for layer in fc:
            layer.weight.mul_(3.0)
    rows(1, model)
    theta = 0.3
    with torch.no_grad():
        for layer in fc:
            w = layer.weight.double()
            # a unit vector orthogonal to each row: w * cos + u * |w| sin turns it by theta
            u = torch.randn_like(w)
            u -= (u * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
            u /= u.norm(dim=1, keepdim=True)
            layer.weight.copy_(w * math.cos(theta) + u * w.norm(dim=1, keepdim=True) * math.sin(theta))
    rows(2, model)
    assert rows.steps == [0, 1, 2]
    assert rows.norms[0] == pytest.approx(truth, rel=1e-12)
    assert rows.norms[1] == pytest.approx(3 * truth, rel=1e-6)
    assert rows.norms[2] == pytest.approx(3 * truth, rel=1e-6)
    assert rows.angles[0] == pytest.approx(0.0, abs=1e-3)  # arccos near 1 loses digits
    assert rows.angles[1] == pytest.approx(theta, rel=1e-5)


def test_weight_rows_grow_only_by_the_second_order_term_with_bn():
    """With BN after every hidden layer, plain SGD grows each row's squared
    norm by eta^2 |g|^2 (the gradient is orthogonal to the row), so the
    recorded norms never fall; without BN nothing forces that."""
    digits = data.load_digits_split()
    rows = ex.train_run(digits, norm="bn", steps=20, lr=0.5, seed=0,
                        callbacks={"rows": ex.WeightRows()}).extras["rows"]
    assert len(rows.norms) == 21 and len(rows.angles) == 20
    assert all(b >= a - 1e-9 for a, b in zip(rows.norms, rows.norms[1:]))
    assert all(angle > 0 for angle in rows.angles)


def test_weight_rows_needs_hidden_layers():
    with pytest.raises(ValueError, match="hidden layers fc1"):
        ex.WeightRows()(0, torch.nn.Linear(3, 2))


def test_add_dropout_inserts_after_activations_and_is_identity_in_eval():
    model = models.make_mlp(6, 8, 3, depth=2, activation="relu", norm="bn", seed=0)
    dropped = ex.add_dropout(model, 0.5)
    names = [n for n, _ in dropped.named_children()]
    assert names == ["fc1", "norm1", "act1", "drop1", "fc2", "norm2", "act2", "drop2", "out"]
    assert [type(m) for m in models.get_layers(dropped, "act")] == [torch.nn.ReLU] * 2
    x = torch.randn(10, 6)
    model.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x), model(x), rtol=0, atol=0)  # same modules, dropout off
    dropped.train()
    out = dropped[:4](x)  # fc1, norm1, act1, drop1 in training mode
    kept = out != 0
    torch.testing.assert_close(out[kept], 2 * dropped[:3](x)[kept] * 1.0)  # survivors scaled by 1/(1-p)
    assert ex.add_dropout(model, 0.0) is model
    with pytest.raises(ValueError, match="dropout probability"):
        ex.add_dropout(model, 1.0)


def test_train_run_is_deterministic_and_leaves_the_global_rng_alone():
    split = blobs_split()
    state = torch.get_rng_state()
    kw = dict(activation="relu", norm="bn", dropout=0.2, hidden=16, depth=2, steps=15,
              batch_size=16, lr=0.1, eval_every=5)
    r1 = ex.train_run(split, seed=3, **kw)
    r2 = ex.train_run(split, seed=3, **kw)
    r3 = ex.train_run(split, seed=4, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert r1.history.loss == r2.history.loss and r1.test.accuracy == r2.test.accuracy
    assert (r1.train_acc, r1.test_acc, r1.test_loss) == (r2.train_acc, r2.test_acc, r2.test_loss)
    assert r1.history.loss != r3.history.loss
    assert r1.test.step == [0, 5, 10, 15] and len(r1.history.step) == 15


def test_train_run_final_numbers_are_evaluate():
    split = blobs_split()
    final = {}

    class Keep:
        def __call__(self, step, model):
            final["model"] = model

    r = ex.train_run(split, norm="bn", hidden=16, depth=2, steps=12, batch_size=16,
                     callbacks={"keep": Keep()})
    model = final["model"]
    assert r.model is model
    assert (r.train_loss, r.train_acc) == training.evaluate(model, split.x_train, split.y_train)
    assert (r.test_loss, r.test_acc) == training.evaluate(model, split.x_test, split.y_test)
    assert "keep" in r.extras and r.test is None


def test_evaluate_batch_stats_uses_the_batch_and_changes_nothing():
    split = blobs_split()
    model = models.make_mlp(6, 16, 3, depth=2, activation="relu", norm="bn", seed=0)
    training.train(model, split.x_train, split.y_train, steps=5, batch_size=16)
    model.eval()
    buffers = [b.clone() for b in model.buffers()]
    loss, acc = ex.evaluate_batch_stats(model, split.x_test, split.y_test)
    # truth: the same network with the BN layers' four formulas on the test batch
    a = split.x_test.double()
    fcs, norms = models.get_layers(model, "fc"), models.get_layers(model, "norm")
    for fc, norm in zip(fcs, norms):
        a = torch.relu(_bn_by_hand(a @ fc.weight.detach().double().T, norm))
    logits = a @ model.out.weight.detach().double().T + model.out.bias.detach().double()
    assert acc == training.accuracy(logits, split.y_test)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, split.y_test)), rel=1e-5)
    assert not model.training
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers))
    # without BN it is plain evaluation
    plain = models.make_mlp(6, 16, 3, depth=2, seed=0)
    assert ex.evaluate_batch_stats(plain, split.x_test, split.y_test) == training.evaluate(
        plain, split.x_test, split.y_test)


def test_class_subset_takes_n_per_class_from_the_training_rows():
    split = blobs_split(n_train=90)
    small = ex.class_subset(split, 7, seed=2)
    assert torch.bincount(small.y_train).tolist() == [7, 7, 7]
    # every kept row is a training row with its own label
    for xi, yi in zip(small.x_train, small.y_train):
        match = (split.x_train == xi).all(dim=1)
        assert match.sum() == 1 and split.y_train[match].item() == yi.item()
    assert small.x_test is split.x_test and small.y_test is split.y_test
    assert torch.equal(ex.class_subset(split, 7, seed=2).x_train, small.x_train)  # seeded
    with pytest.raises(ValueError, match="n_per_class"):
        ex.class_subset(split, 31)


# --------------------------------------------------------------------------
# The chapter's runners, on tiny settings
# --------------------------------------------------------------------------


def test_figure1_run_records_accuracy_and_percentiles():
    split = blobs_split()
    r = ex.figure1_run(split, "bn", seed=0, steps=20, batch_size=16, every=10)
    p = r.extras["percentiles"]
    assert r.test.step == p.steps == [0, 10, 20]
    assert p.values.shape == (3, 3)
    assert np.all(np.diff(p.values, axis=1) >= 0)  # 15th <= 50th <= 85th


def test_lr_table_shapes_and_never_reached():
    split = blobs_split()
    configs = {"a": dict(lr=0.1), "b": dict(lr=0.3, norm="bn")}
    out = ex.lr_table(split, configs, [0, 1], target=1.01, steps=10, every=5,
                      hidden=16, depth=2, batch_size=16)
    for row in out.values():
        assert np.isnan(row["steps"]).all()  # an accuracy above 1 is never reached
        assert row["final"].shape == (2,) and row["curve"].shape == (2, 3)
        assert row["eval_steps"].tolist() == [0, 5, 10]
        np.testing.assert_array_equal(row["curve"][:, -1], row["final"])
    out = ex.lr_table(split, configs, [0], target=0.0, steps=10, every=5, hidden=16, depth=2, batch_size=16)
    assert out["a"]["steps"].tolist() == [0.0]  # reached before the first step


def test_sweeps_shapes_and_fixed_examples():
    split = blobs_split()
    init = ex.init_scale_sweep(split, [0.5, 2.0], [0, 1], hidden=8, depth=2, steps=4, batch_size=16)
    assert set(init) == {None, "bn"} and init["bn"].shape == (2, 2)
    bs = ex.batch_size_sweep(split, [4, 32], [0], hidden=8, depth=2, epochs=1)
    assert bs[None]["test"].shape == bs["bn"]["batch_stats"].shape == (1, 2)
    np.testing.assert_array_equal(bs[None]["test"], bs[None]["batch_stats"])  # no BN: the same
    # one epoch at batch size m is n // m updates
    r = ex.train_run(split, batch_size=32, epochs=1, hidden=8, depth=2)
    assert len(r.history.step) == 96 // 32


def test_generalization_gap_is_train_minus_test():
    split = blobs_split()
    out = ex.generalization_gap(split, {"plain": {}, "drop": dict(dropout=0.5)}, [0, 1],
                                hidden=16, depth=2, steps=10, batch_size=16)
    for row in out.values():
        np.testing.assert_array_equal(row["gap"], row["train"] - row["test"])
        assert row["test_loss"].shape == (2,)


def test_format_table_text_and_nan_handling():
    rows = {"x": {"s": np.array([10.0, 20.0, np.nan]), "f": np.array([0.5, 0.7, 0.6])},
            "yy": {"s": np.array([np.nan, np.nan, np.nan]), "f": np.array([1.0, 1.0, 1.0])}}
    text = ex.format_table(rows, {"s": "{:.0f}", "f": "{:.2f}"}, header="run")
    lines = text.splitlines()
    assert lines[0].split() == ["run", "s", "f"]
    assert lines[1].split() == ["x", "15±5", "(2/3)", f"{0.6:.2f}±{np.std([0.5, 0.7, 0.6]):.2f}"]
    assert lines[2].split() == ["yy", "never", "1.00±0.00"]
    assert len({len(line) for line in lines}) == 1  # fixed width


def test_lr_table_places_bn_where_asked(monkeypatch):
    """norm_position reaches the network lr_table trains: after the activation, the layers are fc, act, norm."""
    split = blobs_split()
    built = {}
    real_build = ex.build_mlp

    def spy(*args, **kw):
        model = built[kw["norm_position"]] = real_build(*args, **kw)
        return model

    monkeypatch.setattr(ex, "build_mlp", spy)
    out = ex.lr_table(split, {"before": dict(norm="bn"), "after": dict(norm="bn", norm_position="after")},
                      seeds=[0], target=0.5, steps=6, every=3, hidden=8, depth=2, batch_size=16)
    names = {k: [n for n, _ in m.named_children()][:3] for k, m in built.items()}
    assert names == {"before": ["fc1", "norm1", "act1"], "after": ["fc1", "act1", "norm1"]}
    assert set(out) == {"before", "after"} and out["after"]["curve"].shape == (1, 3)


def test_variance_shift_is_eval_variance_over_running_var():
    """The ratio by hand (a hook-free forward, float64 var) and the model's modes left alone."""
    split = blobs_split()
    model = ex.build_mlp(6, 3, norm="bn", dropout=0.5, hidden=8, depth=2, seed=0)
    training.train(model, split.x_train, split.y_train, steps=20, batch_size=16, lr=0.1)
    model.eval()  # by hand: no dropout, BN on its running statistics
    with torch.no_grad():
        z = model.fc2(model.drop1(model.act1(model.norm1(model.fc1(split.x_train)))))
    want = z.double().var(0) / model.norm2.running_var.double()
    model.train()
    ratio = ex.variance_shift(model, model.norm2, split.x_train)
    np.testing.assert_allclose(ratio, want.numpy(), rtol=1e-6)
    assert ratio.shape == (8,) and model.training and model.drop1.training
    with pytest.raises(ValueError, match="running_var"):
        ex.variance_shift(model, torch.nn.LayerNorm(8), split.x_train)


def test_dropout_before_bn_shrinks_the_eval_variance():
    """Dropout inflates the training-time variance of what BN sees: at inference it is smaller (ratio < 1)."""
    split = blobs_split()
    ratios = {}
    for p in (0.0, 0.5):
        model = ex.build_mlp(6, 3, norm="bn", dropout=p, hidden=32, depth=2, seed=0)
        training.train(model, split.x_train, split.y_train, steps=60, batch_size=32, lr=0.05)
        ratios[p] = float(ex.variance_shift(model, model.norm2, split.x_train).mean())
    assert 0.9 < ratios[0.0] < 1.1 and ratios[0.5] < 0.85, ratios


def test_stream_std_matches_a_manual_pass_and_keeps_the_buffers():
    model = models.make_resmlp(6, 8, 3, blocks=3, seed=0)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = ex.stream_std(model, x)
    with torch.no_grad():
        h = model.stem(x)
        want = [float(h.std())]
        for b in (1, 2, 3):
            h = getattr(model, f"block{b}")(h)
            want.append(float(h.std()))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    model.load_state_dict(before)  # the manual pass moved the running stats; stream_std must not have
    ex.stream_std(model, x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_branch_ratios_match_a_manual_pass():
    """rms of what each block adds over rms of its input; 0 for SkipInit and for
    gamma_2 = 0; modes and buffers untouched."""
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    model = models.make_resmlp(6, 8, 3, blocks=3, seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = ex.branch_ratios(model, x)
    assert got.shape == (3,) and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.train()
        h, want = model.stem(x), []
        for b in (1, 2, 3):
            block = getattr(model, f"block{b}")
            want.append(float(block.branch(h).norm() / h.norm()))
            h = block(h)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for options in (dict(zero_init=True), dict(norm_layer=None, skip_init=True)):
        assert np.all(ex.branch_ratios(models.make_resmlp(6, 8, 3, blocks=2, seed=0, **options), x) == 0)


def test_variance_shift_of_a_bn_on_sequences():
    """(N, C, L): each channel's variance over N and L, shape (C,), as BN takes it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1), torch.nn.BatchNorm1d(3))
    x = torch.randn(8, 2, 5)
    net(x)
    ratio = ex.variance_shift(net, net[1], x)
    with torch.no_grad():
        z = net[0](x).double()
    expected = z.transpose(0, 1).flatten(1).var(dim=1) / net[1].running_var.double()
    assert ratio.shape == (3,)
    np.testing.assert_allclose(ratio, expected.numpy(), rtol=1e-12)


# --------------------------------------------------------------------------
# Fine-tuning with BN in training mode, frozen, or from scratch (chapter 11)
# --------------------------------------------------------------------------


def six_class_split(seed=0):
    """Six blobs: classes 0-2 to pretrain on, 3-5 to fine-tune on."""
    x, y = data.gaussian_blobs(240, n_features=6, n_classes=6, spread=0.7, seed=seed)
    return Split(x[:180], y[:180], x[180:], y[180:])


def test_class_split_keeps_the_classes_and_relabels_them_in_order():
    split = six_class_split()
    part = ex.class_split(split, [5, 3])
    for x_all, y_all, x_part, y_part in ((split.x_train, split.y_train, part.x_train, part.y_train),
                                         (split.x_test, split.y_test, part.x_test, part.y_test)):
        keep = (y_all == 5) | (y_all == 3)
        assert torch.equal(x_part, x_all[keep])
        assert torch.equal(y_part, torch.where(y_all[keep] == 5, 0, 1))
        assert y_part.dtype == y_all.dtype
    for bad in ([], [3, 3], [9]):
        with pytest.raises(ValueError, match="classes must be distinct labels"):
            ex.class_split(split, bad)


def test_class_split_wants_integer_labels():
    split = six_class_split()
    for bad in ([2.7], ["3"], [True]):
        with pytest.raises(ValueError, match="integer labels"):
            ex.class_split(split, bad)
    assert torch.equal(ex.class_split(split, np.arange(3)).y_train, ex.class_split(split, [0, 1, 2]).y_train)


def _source_target():
    split = six_class_split()
    return ex.class_split(split, [0, 1, 2]), ex.class_split(split, [3, 4, 5])


def test_fine_tune_run_three_ways_seeded_and_pretrained_untouched():
    source, target = _source_target()
    net = ex.pretrain(source, epochs=2, seed=1)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    kw = dict(batch_size=2, n_per_class=4, epochs=2, seed=1)
    accs = [ex.fine_tune_run(target, net, **kw), ex.fine_tune_run(target, net, frozen=True, **kw),
            ex.fine_tune_run(target, None, **kw)]
    assert all(0 <= a <= 1 for a in accs)
    assert accs[1] == ex.fine_tune_run(target, net, frozen=True, **kw)  # seeded
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(ex.pretrain(source, epochs=2, seed=1).fc1.weight, net.fc1.weight)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=1), "batch_size must be an integer >= 2"),
    (dict(batch_size=0, frozen=True), "batch_size must be an integer >= 1"),
    (dict(batch_size=2, epochs=-1), "epochs must be an integer >= 0"),
    (dict(batch_size=2, frozen=True, pretrained=None), "needs a pretrained network"),
    (dict(batch_size=2, pretrained=torch.nn.Linear(6, 3)), "output layer 'out'"),
], ids=["batch-1", "batch-0", "epochs", "frozen-scratch", "not-a-pretrained-net"])
def test_fine_tune_run_checks_its_arguments_before_training(kwargs, match):
    _, target = _source_target()
    kwargs = dict(kwargs)
    pretrained = kwargs.pop("pretrained", "net")
    if pretrained == "net":
        pretrained = ex.build_mlp(6, 3, norm="bn")
    with pytest.raises(ValueError, match=match):
        ex.fine_tune_run(target, pretrained, n_per_class=4, **kwargs)
    with pytest.raises(ValueError, match="takes 5 features, target has 6"):
        ex.fine_tune_run(target, ex.build_mlp(5, 3, norm="bn"), batch_size=2, n_per_class=4)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 2"):
        ex.pretrain(target, batch_size=1)


def test_fine_tune_run_precise_bn_recomputes_the_statistics_after_training(monkeypatch):
    """precise_bn_batch=b: the same training, then precise_bn over the fine-tuning
    examples in batches of b, then the test."""
    source, target = _source_target()
    net = ex.pretrain(source, epochs=2, seed=1)
    kw = dict(batch_size=2, n_per_class=4, epochs=2, seed=1)
    calls = []
    real_precise_bn = bnlib.moving_average.precise_bn

    def spy(model, batches, *args, **kwargs):
        batches = list(batches)
        calls.append([len(b) for b in batches])
        return real_precise_bn(model, batches, *args, **kwargs)

    monkeypatch.setattr(bnlib.moving_average, "precise_bn", spy)
    plain = ex.fine_tune_run(target, net, **kw)
    recomputed = ex.fine_tune_run(target, net, precise_bn_batch=5, **kw)
    assert calls == [[5, 5, 2]]  # 4 examples of each of the 3 classes
    assert 0 <= recomputed <= 1 and 0 <= plain <= 1
    with pytest.raises(ValueError, match="precise_bn_batch needs BN in training mode"):
        ex.fine_tune_run(target, net, frozen=True, precise_bn_batch=5, **kw)
    with pytest.raises(ValueError, match="precise_bn_batch must be an integer >= 2"):
        ex.fine_tune_run(target, net, precise_bn_batch=1, **kw)


def test_fine_tune_run_frozen_keeps_the_pretrained_statistics(monkeypatch):
    """With frozen=True, the model that is fine-tuned holds FrozenBatchNorm layers with the
    pretrained running statistics, and they are the same after fine-tuning."""
    source, target = _source_target()
    net = ex.pretrain(source, epochs=2)
    seen = []
    real_train = training.train

    def spy(model, *args, **kwargs):
        frozen = [m for m in model.modules() if isinstance(m, bnlib.nn.FrozenBatchNorm)]
        before = [m.running_mean.clone() for m in frozen]
        out = real_train(model, *args, **kwargs)
        seen.append((len(frozen), before, [m.running_mean for m in frozen]))
        return out

    monkeypatch.setattr(ex.training, "train", spy)
    ex.fine_tune_run(target, net, frozen=True, batch_size=2, n_per_class=4, epochs=2)
    ((n_fine, before, after),) = seen
    assert n_fine == 3
    torch.testing.assert_close(before[0], net.norm1.running_mean, rtol=0, atol=0)  # the pretrained ones
    for b, a in zip(before, after):
        assert torch.equal(a, b)


def test_with_new_head_copies_and_leaves_the_random_state_alone():
    net = ex.pretrain(blobs_split(n_train=40), epochs=1, batch_size=8, seed=0)
    before = copy.deepcopy(net.state_dict())
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    model = ex.with_new_head(net, 5, seed=3)
    assert torch.equal(torch.rand(1), expected)
    assert model.out.out_features == 5 and model is not net
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    torch.testing.assert_close(model.fc1.weight, net.fc1.weight, rtol=0, atol=0)
    assert torch.equal(ex.with_new_head(net, 5, seed=3).out.weight, model.out.weight)
    with pytest.raises(ValueError, match="output layer 'out'"):
        ex.with_new_head(torch.nn.Sequential(torch.nn.Linear(6, 3)), 5)


def test_train_domain_batches_feeds_one_domain_per_batch_in_turn():
    split = blobs_split(n_train=40)
    x_a, x_b = split.x_train, 10 + split.x_train   # domain b: every input shifted by 10
    model = ex.build_mlp(6, 3, norm="bn", seed=0)
    seen = []
    model.fc1.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].mean().item()))
    losses = ex.train_domain_batches(model, [x_a, x_b], split.y_train, epochs=2, batch_size=8, seed=0)
    assert len(losses) == len(seen) == 2 * 2 * (40 // 8)
    # each batch is one domain: the shift of 10 separates them, and they alternate a, b, a, b
    means = torch.tensor(seen)
    a_batches, b_batches = means[0::2], means[1::2]
    assert a_batches.max() + 5 < b_batches.min()
    assert model.training
    again = ex.build_mlp(6, 3, norm="bn", seed=0)
    assert ex.train_domain_batches(again, [x_a, x_b], split.y_train, epochs=2, batch_size=8, seed=0) == losses


def test_train_domain_batches_running_estimates_average_within_domain_statistics():
    """The running mean ends between the domains' means, and the running variance near
    the variance within a domain, far below the variance of the two domains pooled."""
    split = blobs_split(n_train=64)
    x_a, x_b = split.x_train, 10 + split.x_train
    model = torch.nn.Sequential(bnlib.nn.BatchNorm1d(6, affine=False), torch.nn.Linear(6, 3))
    ex.train_domain_batches(model, [x_a, x_b], split.y_train, epochs=20, batch_size=16, lr=1e-9)
    bn = model[0]
    mean_a, mean_b = x_a.mean(0), x_b.mean(0)
    assert torch.all(bn.running_mean > mean_a + 1) and torch.all(bn.running_mean < mean_b - 1)
    within = x_a.var(0)
    pooled = torch.cat([x_a, x_b]).var(0)
    assert torch.all(bn.running_var < 1.5 * within) and torch.all(pooled > 3 * within)


def test_train_domain_batches_mix_puts_every_domain_in_every_batch(monkeypatch):
    """mix=True: the same number of steps of the same size, each batch half of each
    domain with matching labels, every row of every domain once per epoch; the
    running variance then includes the spread between the domains' means."""
    split = blobs_split(n_train=40)
    x_a, x_b = split.x_train, 10 + split.x_train
    model = ex.build_mlp(6, 3, norm="bn", seed=0)
    batches, targets = [], []
    model.fc1.register_forward_hook(lambda m, inputs, out: batches.append(inputs[0].detach().clone()))
    cross_entropy = torch.nn.functional.cross_entropy

    def spy(logits, target, *args, **kwargs):
        targets.append(target.clone())
        return cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    losses = ex.train_domain_batches(model, [x_a, x_b], split.y_train, epochs=2, batch_size=8, seed=0, mix=True)
    assert len(losses) == len(batches) == len(targets) == 2 * 2 * (40 // 8)
    for batch, target in zip(batches, targets):
        assert batch.shape == (8, 6)
        assert torch.all(batch[:4].mean(1) < 5) and torch.all(batch[4:].mean(1) > 5)
        # every row's label is the label of that row (domain b is domain a plus 10,
        # up to rounding, hence the nearest row)
        rows = torch.cdist(torch.cat([batch[:4], batch[4:] - 10]), x_a).argmin(dim=1)
        assert torch.equal(target, split.y_train[rows])
    first_epoch = torch.cat(batches[:10])
    for x in (x_a, x_b):
        rows = {tuple(r.tolist()) for r in first_epoch}
        assert all(tuple(r.tolist()) in rows for r in x)

    bn_model = torch.nn.Sequential(bnlib.nn.BatchNorm1d(6, affine=False), torch.nn.Linear(6, 3))
    ex.train_domain_batches(bn_model, [x_a, x_b], split.y_train, epochs=20, batch_size=16, lr=1e-9, mix=True)
    pooled = torch.cat([x_a, x_b]).var(0)
    torch.testing.assert_close(bn_model[0].running_var, pooled, rtol=0.3, atol=0)


def test_train_domain_batches_mix_needs_a_batch_size_divisible_by_the_domains():
    split = blobs_split(n_train=40)
    model = ex.build_mlp(6, 3, norm="bn", seed=0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="multiple of the 2 domains, got 9"):
        ex.train_domain_batches(model, [split.x_train, split.x_train], split.y_train,
                                epochs=1, batch_size=9, mix=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_train_domain_batches_checks_its_arguments():
    split = blobs_split(n_train=40)
    model = ex.build_mlp(6, 3, norm="bn", seed=0)
    for domains, kw, match in (([], {}, "at least one"),
                               ([split.x_train[:30]], {}, "rows of y"),
                               ([split.x_train], {"batch_size": 1}, "batch_size must be an integer >= 2"),
                               ([split.x_train], {"batch_size": 41}, "at most the 40 rows"),
                               ([split.x_train], {"lr": 0.0}, "lr must be > 0")):
        kwargs = {"epochs": 1, "batch_size": 8, **kw}
        with pytest.raises(ValueError, match=match):
            ex.train_domain_batches(model, domains, split.y_train, **kwargs)


def test_batch_noise_against_a_hand_computation():
    """One BN layer and a ReLU: the probe row's ReLU output over draws of companions, by hand
    with torch's BN, the same generator and the formula of the docstring."""
    model = torch.nn.Sequential(bnlib.nn.BatchNorm1d(3, affine=False), torch.nn.ReLU()).eval()
    g = torch.Generator().manual_seed(0)
    probe, pool = torch.randn(2, 3, generator=g), torch.randn(30, 3, generator=g)
    before = copy.deepcopy(model.state_dict())
    got = ex.batch_noise(model, probe, pool, batch_size=6, draws=5, seed=7)
    assert got.shape == (1,) and not model.training and not model[0].training
    for name, tensor in model.state_dict().items():   # running estimates left alone
        assert torch.equal(tensor, before[name])

    draws_g = torch.Generator().manual_seed(7)
    values = []
    for row in probe:
        h = []
        for _ in range(5):
            companions = pool[torch.randperm(30, generator=draws_g)[:5]]
            batch = torch.cat([row[None], companions]).double()
            h.append(torch.relu(torch.nn.functional.batch_norm(batch, None, None, training=True))[0])
        h = torch.stack(h)
        values.append(float((h.var(0, unbiased=False).mean() / h.mean(0).pow(2).mean()).sqrt()))
    np.testing.assert_allclose(got, [np.mean(values)], rtol=1e-5)


def test_batch_noise_is_zero_without_batch_statistics_and_falls_with_the_batch():
    g = torch.Generator().manual_seed(1)
    probe, pool = torch.randn(4, 8, generator=g), torch.randn(300, 8, generator=g)
    for norm in (None, "ln"):
        layer = None if norm is None else torch.nn.LayerNorm
        net = models.make_mlp(8, 16, 3, depth=2, activation="relu", norm_layer=layer, seed=0)
        np.testing.assert_allclose(ex.batch_noise(net, probe, pool, batch_size=8, draws=4), 0, atol=1e-12)
    net = models.make_mlp(8, 16, 3, depth=2, activation="relu", norm="bn", seed=0)
    noise = {b: ex.batch_noise(net, probe, pool, batch_size=b, draws=40) for b in (4, 16, 64)}
    assert noise[4].shape == (2,)
    assert (noise[4] > noise[16]).all() and (noise[16] > noise[64]).all()
    # about 1/sqrt(B): four times the batch, about half the noise
    assert (1.5 < noise[16] / noise[64]).all() and (noise[16] / noise[64] < 2.7).all()


def test_batch_noise_of_inverted_dropout_is_sqrt_p_over_1_minus_p():
    """ReLU after dropout is dropout after ReLU (a mask is >= 0): each unit is 0 or h/(1-p),
    whatever the batch, so the noise is sqrt(p/(1-p)) in every layer, 1 at p = 0.5."""
    g = torch.Generator().manual_seed(2)
    probe, pool = torch.randn(3, 5, generator=g), torch.randn(20, 5, generator=g)
    for p in (0.2, 0.5):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.Dropout(p), torch.nn.ReLU())
        noise = ex.batch_noise(net, probe, pool, batch_size=4, draws=800, seed=1)
        np.testing.assert_allclose(noise, [math.sqrt(p / (1 - p))], rtol=0.06)
    # the global generator is left alone, and the dropout masks repeat with the seed
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    first = ex.batch_noise(net, probe, pool, batch_size=4, draws=20, seed=3)
    assert torch.equal(torch.rand(1), expected)
    np.testing.assert_array_equal(first, ex.batch_noise(net, probe, pool, batch_size=4, draws=20, seed=3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=1), "batch_size must be an integer >= 2"),
    (dict(draws=1), "draws must be an integer >= 2"),
    (dict(batch_size=40), "at least batch_size - 1 = 39 rows"),
])
def test_batch_noise_bad_input(kwargs, match):
    net = models.make_mlp(3, 4, 2, depth=1, activation="relu", norm="bn", seed=0)
    args = dict(batch_size=4, draws=3) | kwargs
    with pytest.raises(ValueError, match=match):
        ex.batch_noise(net, torch.zeros(2, 3), torch.zeros(20, 3), **args)


def test_class_subset_and_seed_values_refuse_fractions():
    """1.5 images per class was taken as 2, seeds 0.5 and 1.9 as 0 and 1."""
    split = data.load_digits_split()
    with pytest.raises(ValueError, match="n_per_class must be an integer >= 1"):
        ex.class_subset(split, 1.5)
    with pytest.raises(ValueError, match="every seed must be an integer"):
        ex.seed_values(lambda s: s, [0.5, 1.9])
    assert ex.seed_values(lambda s: s, np.arange(2)).tolist() == [0.0, 1.0]  # NumPy integers are seeds
