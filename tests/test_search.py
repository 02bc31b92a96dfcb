"""The offline mixture search (issue 22): proposals, fits, choice, saving for ``mixture="static"``, resume, imports,
bad inputs, and workers on a journal file and on a real PostgreSQL server, one of them killed mid-trial.

PostgreSQL: ``eval "$(scripts/postgres.sh start)"`` sets ``HFWEIGHT_TEST_POSTGRES_URL``; without it those tests skip,
except under ``CI=true``, where they fail (CI must run them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("lightgbm")

from helpers import cpu_run_args, pad_collate, tiny_model, toy_dataset  # noqa: E402

from hfweight import WeightedTrainer, WeightedTrainingArguments, search_mixture  # noqa: E402
from hfweight.search import choose, fit, proposals  # noqa: E402
from hfweight.search.storage import open_store  # noqa: E402
from hfweight.search.workers import LOSSES_ATTR, PROPOSAL_ATTR, WORKER_ATTR, load_study  # noqa: E402
from hfweight.strategies.mixture.static import StaticMixture  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ["code", "math", "prose"]
FAST = {"n_candidates": 2000, "top_k": 16}


# ---- proposals ------------------------------------------------------------------------------------------------------


def test_smoothed_prior_is_square_root_of_token_shares():
    # shares 0.2 / 0.8 → sqrt 0.447 / 0.894 → normalized 1/3, 2/3
    np.testing.assert_allclose(proposals.smoothed_prior(np.array([1.0, 4.0])), [1 / 3, 2 / 3], rtol=1e-12)


def test_proposals_sum_to_one_within_repetition_caps_and_prefix_stable():
    tokens = np.array([1000.0, 200.0, 5000.0, 50.0])
    final_tokens, max_repetition = 2000.0, 4.0
    prior = proposals.smoothed_prior(tokens)
    caps = proposals.repetition_caps(tokens, final_tokens, max_repetition)
    x = proposals.propose(prior, caps, 300, seed=3)
    assert x.shape == (300, 4)
    np.testing.assert_allclose(x.sum(axis=1), 1.0, atol=1e-12)
    assert (x >= 0).all()
    epochs = x * final_tokens / tokens[None, :]  # independent check: epochs of each domain in the final run
    assert epochs.max() <= max_repetition + 1e-9
    assert (x[:, 3] <= 50 * 4 / 2000 + 1e-12).all()  # the small domain is capped at 0.1 and the cap binds
    assert x[:, 3].max() > 0.05
    assert ((x > 0) & (x < proposals.MIN_SHARE)).sum() == 0
    np.testing.assert_array_equal(proposals.propose(prior, caps, 120, seed=3), x[:120])
    assert not np.array_equal(proposals.propose(prior, caps, 120, seed=4), x[:120])


def test_uncapped_proposals_center_on_the_prior():
    prior = np.array([0.5, 0.3, 0.2])
    x = proposals.propose(prior, np.ones(3), 4000, seed=0)
    np.testing.assert_allclose(x.mean(axis=0), prior, atol=0.03)  # Dirichlet(prior · s) has mean prior for every s


def test_caps_too_tight_are_refused():
    with pytest.raises(ValueError, match="sum to .* < 1"):
        proposals.check_caps_feasible(proposals.repetition_caps(np.array([10.0, 10.0]), 1000.0, 4.0), ["a", "b"])


# ---- fits -----------------------------------------------------------------------------------------------------------


def _dirichlet(n, k, seed):
    return np.random.default_rng(seed).dirichlet(np.ones(k), n)


def test_loglinear_law_recovers_known_parameters():
    X = _dirichlet(40, 3, 0)
    a, t = np.log(2.0), np.array([0.8, -1.0, 0.3])
    y = np.exp(a) + np.exp(X @ t)  # L(x) = exp(a) + exp(t·x), written out independently of the module
    params = fit.fit_loglinear_one(X, y, seed=0)
    np.testing.assert_allclose(params, np.concatenate([[a], t]), atol=0.02)
    predict = fit.fit_loglinear(X, np.stack([y, 2 * y], axis=1), seed=0)  # two targets: their mean is predicted
    Z = _dirichlet(10, 3, 1)
    np.testing.assert_allclose(predict(Z), 1.5 * (np.exp(a) + np.exp(Z @ t)), rtol=1e-2)


def test_model_selection_picks_lightgbm_for_a_non_monotone_target_and_the_law_for_a_law():
    X = _dirichlet(60, 3, 2)
    bowl = ((X[:, 0] - 0.35) ** 2 + 0.05 * X[:, 1])[:, None]  # not monotone along any direction: no log-linear law
    chosen = fit.select_model(X, bowl, seed=0)
    assert chosen.chosen == "lightgbm", chosen.spearman
    assert chosen.spearman["lightgbm"] > 0.5 > chosen.spearman["loglinear"]
    law = (1.0 + np.exp(X @ np.array([1.0, -0.5, 0.0])))[:, None]
    law_fit = fit.select_model(X, law, seed=0)
    assert law_fit.chosen == "loglinear" and law_fit.spearman["loglinear"] > 0.99
    np.testing.assert_allclose(law_fit.out_of_fold["loglinear"], law[:, 0], rtol=1e-3)


def test_model_selection_prefers_the_simpler_fit_within_the_margin():
    X = _dirichlet(40, 3, 4)
    Y = (X @ np.array([1.0, 2.0, 3.0]))[:, None]

    def fitter(decimals):  # the truth, rounded: ties lower the rank correlation a little (1 decimal) or a lot (0)
        return lambda X_fit, Y_fit, seed: (lambda Z: np.round(Z @ np.array([1.0, 2.0, 3.0]), decimals))

    exact = lambda X_fit, Y_fit, seed: (lambda Z: Z @ np.array([1.0, 2.0, 3.0]))  # noqa: E731
    close = fit.select_model(X, Y, fitters={"simple": fitter(1), "trees": exact})
    assert 1.0 - fit.PREFER_SIMPLER_WITHIN < close.spearman["simple"] < close.spearman["trees"] == 1.0
    assert close.chosen == "simple"
    far = fit.select_model(X, Y, fitters={"simple": fitter(0), "trees": exact})
    assert far.spearman["simple"] < 1.0 - fit.PREFER_SIMPLER_WITHIN and far.chosen == "trees"


# ---- choice ---------------------------------------------------------------------------------------------------------


def test_choice_respects_caps_and_the_kl_term():
    prior = np.array([0.2, 0.3, 0.5])
    caps = np.array([0.3, 1.0, 1.0])

    def predict(X):  # strongly prefers domain 0
        return -X[:, 0]

    free = choose.choose_mixture(predict, prior, caps, seed=0, n_candidates=20_000, top_k=32, kl_weight=0.0)
    assert free.weights[0] <= 0.3 + 1e-9 and free.weights[0] > 0.27  # pushed to the cap, never past it
    assert (free.top[:, 0] <= 0.3 + 1e-12).all()
    np.testing.assert_allclose(free.weights.sum(), 1.0)
    anchored = choose.choose_mixture(predict, prior, caps, seed=0, n_candidates=20_000, top_k=32, kl_weight=100.0)
    kl = float(np.sum(anchored.weights * np.log(anchored.weights / prior)))  # KL(x ‖ prior) by hand
    assert kl == pytest.approx(anchored.kl_to_prior, rel=1e-9)
    assert kl < 0.01 < free.kl_to_prior  # a heavy KL weight keeps the choice at the prior
    np.testing.assert_allclose(anchored.weights, prior, atol=0.06)


# ---- the search end to end (tiny model, a few steps per proxy) -----------------------------------------------------


def _data():
    train = toy_dataset(60)
    evals = {d: train.filter(lambda r, d=d: r["domain"] == d).select(range(4)) for d in DOMAINS}
    return train, evals


class CountingInit:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return tiny_model()


def _args(tmp_path, **fields):
    return WeightedTrainingArguments(**cpu_run_args(str(tmp_path / "proxies"), max_steps=2, learning_rate=1e-2,
                                                    logging_steps=10, disable_tqdm=True), **fields)


def _search(tmp_path, init, **kwargs):
    train, evals = _data()
    kwargs = {"n_trials": 4, "data_collator": pad_collate, **FAST, **kwargs}
    return search_mixture(init, _args(tmp_path), train, evals, **kwargs)


def test_search_result_saves_a_file_mixture_static_loads(tmp_path):
    init = CountingInit()
    result = _search(tmp_path, init, target=["code", "math"])
    assert init.calls == 4
    assert set(result.weights) == set(DOMAINS) and sum(result.weights.values()) == pytest.approx(1.0, abs=1e-12)
    written = result.save(str(tmp_path / "out" / "mixture_weights.json"))
    report = json.load(open(written["json"]))
    assert len(report["proxies"]) == 4 and set(report["fit"]["spearman"]) == {"loglinear", "lightgbm"}
    for proxy in report["proxies"]:
        assert proxy["target_loss"] == pytest.approx(np.mean([proxy["eval_losses"][t] for t in ("code", "math")]))
    assert os.path.exists(written["csv"]) and os.path.exists(written.get("png", written["csv"]))
    static = StaticMixture(weights=written["weights"])
    static.bind(DOMAINS)
    np.testing.assert_allclose(static.probabilities().numpy(), [result.weights[d] for d in DOMAINS], atol=1e-12)
    args = _args(tmp_path, mixture="static", mixture_mode="resample", mixture_kwargs={"weights": written["weights"]})
    trainer = WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(60), data_collator=pad_collate)
    trainer.train()
    np.testing.assert_allclose(trainer.mixture.probabilities().numpy(), [result.weights[d] for d in DOMAINS],
                               atol=1e-12)


def test_rerun_resumes_without_retraining_and_more_trials_extend(tmp_path):
    storage = str(tmp_path / "study.journal")
    first = CountingInit()
    result = _search(tmp_path, first, storage=storage)
    assert first.calls == 4
    again = CountingInit()
    rerun = _search(tmp_path, again, storage=storage)
    assert again.calls == 0
    assert rerun.weights == pytest.approx(result.weights)
    more = CountingInit()
    extended = _search(tmp_path, more, storage=storage, n_trials=5)
    assert more.calls == 1 and len(extended.report["proxies"]) == 5
    assert sorted(p["proposal"] for p in extended.report["proxies"]) == [0, 1, 2, 3, 4]
    fewer = CountingInit()
    prefix = _search(tmp_path, fewer, storage=storage, n_trials=4)  # fits the first 4 proposals only, trains nothing
    assert fewer.calls == 0 and sorted(p["proposal"] for p in prefix.report["proxies"]) == [0, 1, 2, 3]
    assert prefix.weights == pytest.approx(result.weights)


def test_import_results_table(tmp_path):
    """A results table (one share column per domain, one loss column per eval name) becomes complete trials."""
    table = tmp_path / "results.csv"
    train, _ = _data()
    evals = {"heldout": train.select(range(8))}
    table.write_text("code,math,prose,heldout\n0.5,0.25,0.25,4.1\n0.2,0.2,0.6,4.0\n1,0,0,4.3\n")
    args = _args(tmp_path)
    kwargs = {"n_trials": 4, "data_collator": pad_collate, "storage": str(tmp_path / "s.journal"), "run": False}
    search_mixture(CountingInit(), args, train, evals, import_from=str(table), **kwargs)
    search_mixture(CountingInit(), args, train, evals, import_from=str(table), **kwargs)  # importing twice adds once
    study = load_study(open_store(str(tmp_path / "s.journal")), "mixture_search", create=False)
    imported = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.value for t in imported) == [4.0, 4.1, 4.3]
    assert imported[0].params == pytest.approx({"code": 0.5, "math": 0.25, "prose": 0.25})
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]) == 4
    table.write_text("code,math,heldout\n0.5,0.5,4.0\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['prose'\]"):
        search_mixture(CountingInit(), args, train, evals, import_from=str(table), **kwargs)


# ---- bad input: a clear error, nothing written ---------------------------------------------------------------------


@pytest.mark.parametrize("case, match", [
    ({"target": ["code", "poetry"]}, r"target \['poetry'\] is not among the eval names"),
    ({"domains": ["code", "math", "prose", "legal"]}, r"Domain\(s\) \['legal'\] have no rows"),
    ({"n_trials": 3}, r"n_trials=3 is below the number of domains \+ 1 \(3 \+ 1 = 4\)"),
    ({"storage": "postgresql://nobody@127.0.0.1:1/none"}, r"'postgresql://nobody@127.0.0.1:1/none' cannot be reached"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, case, match):
    init = CountingInit()
    kwargs = {"storage": str(tmp_path / "study.journal"), **case}
    with pytest.raises(ValueError, match=match):
        _search(tmp_path, init, **kwargs)
    assert init.calls == 0
    assert not os.path.exists(tmp_path / "study.journal") and not os.path.exists(tmp_path / "proxies")


def test_storage_password_is_redacted_and_sqlite_refused_for_workers():
    with pytest.raises(ValueError) as err:
        open_store("postgresql://user:secret@127.0.0.1:1/db")
    assert "secret" not in str(err.value) and "user:***@" in str(err.value)
    with pytest.raises(ValueError, match="SQLite is not safe for parallel workers"):
        open_store("sqlite:///x.db", worker=True)


# ---- static mixture files (issue 21 part 5, issue 22) ---------------------------------------------------------------


def _bound(path):
    mixture = StaticMixture(weights=str(path))
    mixture.bind(DOMAINS)
    return mixture.probabilities().numpy()


def test_static_weights_file_holding_a_list_is_read_in_sorted_domain_order(tmp_path):
    (tmp_path / "bare.json").write_text("[1, 2, 1]")
    (tmp_path / "wrapped.json").write_text('{"weights": [3, 0, 1]}')
    np.testing.assert_allclose(_bound(tmp_path / "bare.json"), [0.25, 0.5, 0.25])  # code, math, prose
    np.testing.assert_allclose(_bound(tmp_path / "wrapped.json"), [0.75, 0.0, 0.25])


def test_static_weights_file_for_other_domains_names_missing_extra_and_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"weights": {"code": 1, "math": 1, "legal": 1}}))
    with pytest.raises(ValueError) as err:
        _bound(path)
    message = str(err.value)
    assert str(path) in message and "missing ['prose']" in message and "extra ['legal']" in message
    (tmp_path / "short.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds a list of 2 weights but the dataset has 3 domains"):
        _bound(tmp_path / "short.json")
    (tmp_path / "text.json").write_text('"code"')
    with pytest.raises(ValueError, match="holds a str"):
        StaticMixture(weights=str(tmp_path / "text.json"))


# ---- workers: two processes on one study, one killed mid-trial ----------------------------------------------------

RECIPE = os.path.join(ROOT, "recipes", "tiny", "search_mixture.yaml")


def _cli_args(tmp_path, storage: str, study: str) -> list[str]:
    return ["--config", RECIPE, "--output_dir", str(tmp_path / "out"), "--storage", storage, "--study", study,
            "--n_trials", "6", "--max_steps", "6", "--per_device_train_batch_size", "4", "--max_length", "32",
            "--max_eval_samples_per_domain", "4", "--n_candidates", "2000", "--top_k", "16",
            "--heartbeat_interval", "1", "--grace_period", "8", "--logging_steps", "100"]


def _worker(args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hfweight.search", *args, "--worker", "true"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _running_trial_of(study, pid: int):
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if str(trial.user_attrs.get(WORKER_ATTR, "")).endswith(f":{pid}"):
            return trial
    return None


def run_killed_worker_scenario(tmp_path, storage: str):
    """Enqueue (main, in process), two CLI workers, SIGKILL one mid-trial; the other finishes everything, retrying
    the dead trial after the grace period; then the main command reruns: it trains nothing and fits."""
    from hfweight.search.cli import main

    study_name = f"kill_{uuid.uuid4().hex[:8]}"
    args = _cli_args(tmp_path, storage, study_name)
    assert main(args + ["--enqueue_only", "true"]) == 0
    study = load_study(open_store(storage), study_name, create=False)
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    victim, survivor = _worker(args, logs[0]), _worker(args, logs[1])
    try:
        deadline, killed = time.time() + 240, None
        while time.time() < deadline and killed is None and victim.poll() is None:
            killed = _running_trial_of(study, victim.pid)
            time.sleep(0.1)
        assert killed is not None, open(tmp_path / "worker0.log").read()[-3000:]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
        assert survivor.wait(400) == 0, open(tmp_path / "worker1.log").read()[-3000:]
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.kill()
        for log in logs:
            log.close()
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    by_proposal = sorted(t.user_attrs[PROPOSAL_ATTR] for t in complete)
    assert by_proposal == list(range(6)), [(t.number, t.state, t.user_attrs) for t in trials]  # each exactly once
    dead = study.trials[killed.number]
    assert dead.state == optuna.trial.TrialState.FAIL
    retry = [t for t in complete if t.user_attrs[PROPOSAL_ATTR] == killed.user_attrs[PROPOSAL_ATTR]]
    assert retry[0].number > killed.number and str(retry[0].user_attrs[WORKER_ATTR]).endswith(f":{survivor.pid}")
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)]
    assert all(LOSSES_ATTR in t.user_attrs for t in complete)
    # resume after everything stopped: the main command trains nothing, fits, writes the weights
    assert main(args) == 0
    after = study.get_trials(deepcopy=False)
    assert len([t for t in after if t.state == optuna.trial.TrialState.COMPLETE]) == 6 and len(after) == len(trials)
    weights = json.load(open(tmp_path / "out" / "mixture_weights.json"))["weights"]
    assert sum(weights.values()) == pytest.approx(1.0) and len(weights) == 5


@pytest.mark.slow
def test_two_workers_on_a_journal_file_one_killed(tmp_path):
    run_killed_worker_scenario(tmp_path, str(tmp_path / "study.journal"))


def postgres_url() -> str:
    url = os.environ.get("HFWEIGHT_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but HFWEIGHT_TEST_POSTGRES_URL is unset: start the server with "
                        "`eval \"$(scripts/postgres.sh start)\"` before the tests.")
        pytest.skip("HFWEIGHT_TEST_POSTGRES_URL unset (eval \"$(scripts/postgres.sh start)\" to run)")
    return url


@pytest.mark.slow
def test_two_workers_on_postgresql_one_killed(tmp_path):
    run_killed_worker_scenario(tmp_path, postgres_url())


def test_postgresql_search_resumes(tmp_path):
    url = postgres_url()
    study = f"resume_{uuid.uuid4().hex[:8]}"
    first, again = CountingInit(), CountingInit()
    result = _search(tmp_path, first, storage=url, study_name=study)
    rerun = _search(tmp_path, again, storage=url, study_name=study)
    assert (first.calls, again.calls) == (4, 0) and rerun.weights == pytest.approx(result.weights)

