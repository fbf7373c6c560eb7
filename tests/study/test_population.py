"""Population training: K models as one batched computation, and K trials asked and told at once.

Oracles: K separate ``train()`` runs with the same seeds and batch order (float64, to 1e-12), and
for the study a population = 1 run of the same grid (Optuna's storage and MLflow's store).
"""

import dataclasses

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

import pipeline.study.population
from pipeline.config import ConfigError, TrainingConfig
from pipeline.data import load_split
from pipeline.model import build_mlp
from pipeline.stacked import plan_groups, train_population, train_sets
from pipeline.storage import open_storage
from pipeline.train import Hyper, replicate_seeds, train
from tests.conftest import tiny_study

# (hidden, activation, hyper): widths, depths' padding, both activations, momentum and decay on/off
MEMBERS = [
    ((16, 8), "tanh", Hyper(0.1, 0.9, 1e-3)),
    ((4, 8), "relu", Hyper(0.05)),
    ((16, 3), "relu", Hyper(0.2, 0.5, 1e-2)),
    ((7, 8), "tanh", Hyper(0.02, 0.0, 0.1)),
    ((16, 8), "relu", Hyper(0.1, 0.9)),
]


@pytest.fixture(scope="module")
def split():
    return load_split(tiny_study().dataset)


def _model(split, hidden, activation, seed=3):
    return build_mlp(split.input_dim, hidden, activation, seed=seed, dtype=torch.float64)


def _assert_same(single, population):
    """Parameters and the whole per-epoch history, float64, to round-off."""
    (model_a, result_a), (model_b, result_b) = single, population
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert len(result_a.history) == len(result_b.history)
    for ra, rb in zip(result_a.history, result_b.history, strict=True):
        assert ra.epoch == rb.epoch
        assert (ra.train_acc, ra.val_acc) == (rb.train_acc, rb.val_acc)
        assert ra.train_loss == pytest.approx(rb.train_loss, abs=1e-12, nan_ok=True)
        assert ra.val_loss == pytest.approx(rb.val_loss, abs=1e-12, nan_ok=True)
    assert (result_a.diverged_at, result_a.stopped_at) == (result_b.diverged_at, result_b.stopped_at)


@pytest.mark.parametrize(
    ("loss", "shuffle", "batch_size", "limit"),
    [
        ("ce", True, 32, None),  # one group per activation: stacking and padding
        ("mse", False, 32, None),
        ("ce", True, 0, None),  # full batch
        ("ce", True, 32, 2000),  # small groups and single members
        ("mse", True, 32, 1),  # every member alone
    ],
)
def test_population_equals_separate_runs(split, loss, shuffle, batch_size, limit):
    config = TrainingConfig(
        epochs=4, batch_size=batch_size, shuffle=shuffle, seed=3, loss=loss, dtype="float64"
    )
    singles = []
    for hidden, activation, hyper in MEMBERS:
        model = _model(split, hidden, activation)
        singles.append((model, train(model, split, hyper, config)))
    models = [_model(split, h, a) for h, a, _ in MEMBERS]
    results = train_population(models, split, [m[2] for m in MEMBERS], config, group_limit=limit)
    for single, population in zip(singles, zip(models, results, strict=True), strict=True):
        _assert_same(single, population)
    # the runs moved the weights, or the comparison proves nothing
    start = _model(split, *MEMBERS[0][:2])
    assert (next(models[0].parameters()) - next(start.parameters())).abs().max() > 1e-3


def test_a_diverged_member_is_dropped_and_the_others_go_on(split):
    config = TrainingConfig(epochs=4, batch_size=32, seed=0, dtype="float64")
    hypers = [Hyper(0.1), Hyper(1e12), Hyper(0.05, 0.9)]
    models = [_model(split, (8,), "relu", seed=0) for _ in hypers]
    results = train_population(models, split, hypers, config, group_limit=None)
    assert results[1].diverged_at is not None and len(results[1].history) == results[1].diverged_at
    assert results[1].outcome.startswith("diverged")
    for i in (0, 2):
        single = _model(split, (8,), "relu", seed=0)
        _assert_same((single, train(single, split, hypers[i], config)), (models[i], results[i]))


def test_a_callback_stops_only_its_member(split):
    """Pruning one trial: it stops after epoch 2 with the weights it had then; the rest train on."""
    config = TrainingConfig(epochs=4, batch_size=32, seed=0, dtype="float64")
    hypers = [Hyper(0.1), Hyper(0.05, 0.9), Hyper(0.2)]
    seen = {0: [], 1: [], 2: []}

    def watcher(i, stop_at=None):
        return lambda r: seen[i].append(r.epoch) or r.epoch == stop_at

    models = [_model(split, (8,), "tanh", seed=0) for _ in hypers]
    callbacks = [watcher(0), watcher(1, stop_at=2), watcher(2)]
    results = train_population(models, split, hypers, config, callbacks, group_limit=None)
    assert seen == {0: [1, 2, 3, 4], 1: [1, 2], 2: [1, 2, 3, 4]}
    assert results[1].stopped_at == 2 and results[0].stopped_at is None
    single = _model(split, (8,), "tanh", seed=0)
    reference = train(single, split, hypers[1], config, lambda r: r.epoch == 2)
    _assert_same((single, reference), (models[1], results[1]))


def test_groups_keep_one_activation_and_bound_size_and_padding():
    widths = [
        (5, "relu"),
        (500, "relu"),
        (10, "tanh"),
        (100, "relu"),
        (16, "relu"),
        (20, "relu"),
        (8, "relu"),
    ]
    models = [build_mlp(2, (h,), a, seed=0) for h, a in widths]
    assert plan_groups(models, batch=200, limit=None) == [[0, 6, 4, 5, 3, 1], [2]]
    # 5, 8, 16, 20 units: padding <= 4x holds for all, but 4 x 200 x 20 > 10 000 activations
    assert plan_groups(models, batch=200, limit=10_000) == [[0, 6, 4], [5], [3], [1], [2]]
    # no size limit to speak of: 100 and 500 still train alone (padding 5 -> 100 would be 20x)
    assert plan_groups(models, batch=200, limit=1 << 30) == [[0, 6, 4, 5], [3], [1], [2]]
    assert plan_groups(models, batch=200, limit=1) == [[0], [6], [4], [5], [3], [1], [2]]


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"training__population": 0}, "population"),
        ({"training__population": 2, "training__backward": "manual"}, "autograd"),
        ({"training__precision": "bf16", "training__dtype": "float64"}, "float32"),
        ({"training__precision": "half"}, "precision"),
    ],
)
def test_config_refuses_what_population_and_bf16_cannot_do(changes, word):
    with pytest.raises(ConfigError, match=word):
        tiny_study(**changes)


def test_bf16_precision_is_autocast_of_the_forward_pass(split):
    """Oracle: the same steps written out with ``torch.autocast``; weights stay float32."""
    config = TrainingConfig(epochs=2, batch_size=0, shuffle=False, seed=0, precision="bf16")
    model = build_mlp(split.input_dim, (8,), "tanh", seed=0)
    train(model, split, Hyper(0.5), config)
    ref = build_mlp(split.input_dim, (8,), "tanh", seed=0)
    for _ in range(2):
        ref.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(ref(split.x_train), split.y_train)
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    full = build_mlp(split.input_dim, (8,), "tanh", seed=0)
    train(full, split, Hyper(0.5), dataclasses.replace(config, precision="full"))
    assert not torch.equal(next(full.parameters()), next(model.parameters()))


# ----------------------------------------------------------------------------------------------
# The study: ask K, train together, tell each


def _run(cfg, ws, **kw):
    return ws.run(cfg, storage=str(ws["root"] / "storage" / f"{cfg.name}.journal"), **kw)


def _trials(ws, name):
    storage = open_storage(str(ws["root"] / "storage" / f"{name}.journal"))
    return optuna.load_study(study_name=name, storage=storage).trials


def _grid_study(name, population, trials, lr=(1e200, 0.05)):
    return tiny_study(
        name=name,
        trials=trials,
        sampler__kind="grid",
        search__lr={"choices": list(lr)},
        search__momentum={"choices": [0.0, 0.9]},
        model__activation="relu",
        training__dtype="float64",
        training__population=population,
    )


@pytest.mark.slow
def test_population_study_gives_the_same_trials_as_one_at_a_time(workspace):
    """Oracle: the population = 1 study of the same grid (the grid assigns params by trial number)."""
    one = _run(_grid_study("one", 1, trials=3), workspace)
    many = _run(_grid_study("many", 2, trials=3), workspace)  # rounds of 2 and 1
    a, b = _trials(workspace, "one"), _trials(workspace, "many")
    assert len(a) == len(b) == 3  # the cap, exactly
    assert (many.n_complete, many.n_pruned, many.n_failed) == (one.n_complete, one.n_pruned, 0)
    assert one.n_pruned >= 1 and one.n_complete >= 1  # lr = 1e200 diverged: PRUNED, with its reason
    for ta, tb in zip(a, b, strict=True):
        assert ta.params == tb.params and ta.state == tb.state
        if ta.state == TrialState.COMPLETE:
            assert ta.value == tb.value
            assert ta.user_attrs["test_error"] == tb.user_attrs["test_error"]
        else:
            assert "non-finite loss" in tb.user_attrs["reason"]
    client = MlflowClient(workspace["tracking_uri"])
    for name, trials in (("one", a), ("many", b)):
        exp = client.get_experiment_by_name(name)
        runs = {
            int(r.data.tags["optuna_trial"]): r
            for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("pipeline_role") == "trial"
        }
        assert sorted(runs) == [t.number for t in trials]
        assert {r.info.status for r in runs.values()} == {"FINISHED"}
    # per-epoch curves logged for every member, equal to the one-at-a-time run's
    one_runs = _runs_by_trial(client, "one")
    many_runs = _runs_by_trial(client, "many")
    for number, run in many_runs.items():
        assert run.data.params["training.population"] == "2"
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss"))
        reference = sorted(
            (m.step, m.value) for m in client.get_metric_history(one_runs[number].info.run_id, "val_loss")
        )
        assert [s for s, _ in history] == [s for s, _ in reference]
        assert [v for _, v in history] == pytest.approx([v for _, v in reference], abs=1e-12, nan_ok=True)
    # resuming with a larger total asks only the missing trials
    _run(_grid_study("many", 2, trials=4), workspace)
    assert len(_trials(workspace, "many")) == 4


def _runs_by_trial(client, name):
    exp = client.get_experiment_by_name(name)
    return {
        int(r.data.tags["optuna_trial"]): r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("pipeline_role") == "trial"
    }


@pytest.mark.slow
def test_a_failing_member_fails_alone_and_every_run_is_closed(workspace, monkeypatch):
    cfg = _grid_study("fails", 2, trials=2, lr=(0.05, 0.2))
    real = pipeline.study.population.finish_trial

    def finish(trial, *args):
        if trial.number == 1:
            raise RuntimeError("report stage broke")
        return real(trial, *args)

    monkeypatch.setattr(pipeline.study.population, "finish_trial", finish)
    with pytest.raises(RuntimeError, match="report stage broke"):
        _run(cfg, workspace)
    trials = _trials(workspace, "fails")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert "report stage broke" in trials[1].user_attrs["reason"]
    client = MlflowClient(workspace["tracking_uri"])
    runs = _runs_by_trial(client, "fails")
    assert {n: r.info.status for n, r in runs.items()} == {0: "FINISHED", 1: "FAILED"}


@pytest.mark.parametrize(("loss", "batch_size", "limit"), [("ce", 32, None), ("mse", 32, 1), ("ce", 0, None)])
def test_replicates_equal_separate_runs_with_their_own_seeds(split, loss, batch_size, limit):
    """A trial's K replicates as one lockstep set: each equals train() with its own seed (init and
    batch order), float64 to 1e-12 — also when two trials' sets share the population."""
    config = TrainingConfig(epochs=4, batch_size=batch_size, seed=5, loss=loss, dtype="float64", seeds=3)
    seeds = replicate_seeds(config)
    assert len(set(seeds)) == 3 and config.seed not in seeds
    trials = [((16, 8), "tanh", Hyper(0.1, 0.9, 1e-3)), ((12, 8), "tanh", Hyper(0.05, 0.5))]
    singles = []
    for hidden, activation, hyper in trials:
        for seed in seeds:
            model = _model(split, hidden, activation, seed=seed)
            singles.append((model, train(model, split, hyper, dataclasses.replace(config, seed=seed))))
    models = [_model(split, h, a, seed=s) for h, a, _ in trials for s in seeds]
    hypers = [hyper for _, _, hyper in trials for _ in seeds]
    seen: list[list[int]] = [[], []]

    def watch(s):
        def on_epoch(records):
            assert len(records) == 3  # the whole set, every epoch
            seen[s].append(records[0].epoch)

        return on_epoch

    results = train_sets(
        models, split, hypers, config, [[0, 1, 2], [3, 4, 5]], [watch(0), watch(1)], limit, seeds * 2
    )
    for single, replicate in zip(singles, zip(models, results, strict=True), strict=True):
        _assert_same(single, replicate)
    assert seen == [[1, 2, 3, 4], [1, 2, 3, 4]]
    # the seeds made different networks, or the per-member batch order proves nothing
    assert not torch.equal(models[0].linears[0].weight, models[1].linears[0].weight)


def test_a_set_stops_together(split):
    """The set's callback stops all its members at once; another set goes on."""
    config = TrainingConfig(epochs=5, batch_size=32, seed=5, dtype="float64", seeds=2)
    seeds = replicate_seeds(config) * 2
    models = [_model(split, (8,), "tanh", seed=s) for s in seeds]
    results = train_sets(
        models,
        split,
        [Hyper(0.1)] * 4,
        config,
        [[0, 1], [2, 3]],
        [lambda records: records[0].epoch == 2, None],
        seeds=seeds,
    )
    assert [r.stopped_at for r in results] == [2, 2, None, None]
    assert [len(r.history) for r in results] == [2, 2, 5, 5]


def test_a_diverging_replicate_stops_its_set(split):
    config = TrainingConfig(epochs=5, batch_size=32, seed=5, dtype="float64", seeds=2)
    seeds = replicate_seeds(config)
    config = dataclasses.replace(config, loss="mse")
    models = [_model(split, (8,), "relu", seed=s) for s in seeds]
    results = train_sets(models, split, [Hyper(1e3), Hyper(0.01)], config, [[0, 1]], seeds=seeds)
    epoch = results[0].diverged_at
    assert epoch is not None and epoch < config.epochs  # member 0 diverged, and member 1 stopped with it
    assert (results[1].diverged_at, results[1].stopped_at) == (None, epoch)
    assert len(results[0].history) == len(results[1].history) == epoch
