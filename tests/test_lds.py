import numpy as np
import pytest
from scipy import stats

from diffattr.lds import (lds, lds_difference_interval, lds_interval, oracle_predictions, select_lambda,
                          spearman_rows)
from diffattr.protocol import lambda_grid
from diffattr.score import subset_predictions


def loop_spearman(pred, truth):
    return np.array([stats.spearmanr(p, t).statistic for p, t in zip(pred, truth)])


def correlated(m=6, n_subsets=50, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(m, n_subsets))
    return pred, pred + noise * rng.normal(size=(m, n_subsets))


def test_spearman_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 4, size=(7, 15)).astype(float)  # many ties on both sides
    truth = pred + rng.integers(-2, 3, size=(7, 15))
    truth[2] = -truth[2]
    got = spearman_rows(pred, truth)
    np.testing.assert_allclose(got, loop_spearman(pred, truth), rtol=1e-12)
    assert np.all(np.isfinite(got))


def test_spearman_rows_constant_row_is_nan():
    pred, truth = correlated(m=4, n_subsets=10)
    pred[1] = 3.0
    truth[3] = -1.0
    got = spearman_rows(pred, truth)
    assert np.isnan(got[1]) and np.isnan(got[3])
    np.testing.assert_allclose(got[[0, 2]], loop_spearman(pred[[0, 2]], truth[[0, 2]]), rtol=1e-12)
    assert lds(pred, truth) == pytest.approx(np.mean(got[[0, 2]]), rel=1e-12)


def test_lds_interval_contains_estimate_and_is_reproducible():
    pred, truth = correlated()
    point = lds(pred, truth)
    low, high = lds_interval(pred, truth, seed=3)
    assert 0.5 < low < point < high < 1
    assert lds_interval(pred, truth, seed=3) == (low, high)
    assert lds_interval(pred, truth, seed=4) != (low, high)


def test_lds_interval_exact_monotone():
    pred, _ = correlated(noise=0)
    truth = np.exp(2 * pred) - 5  # strictly increasing in pred: every resample has Spearman 1
    assert lds(pred, truth) == pytest.approx(1, abs=1e-12)
    low, high = lds_interval(pred, truth)
    assert high == pytest.approx(1, abs=1e-12)
    assert low == pytest.approx(1, abs=1e-12)


@pytest.fixture(scope="module")
def grid_preds():
    """Predictions whose subset rankings change along the lambda grid (widely spread eigenvalues)."""
    rng = np.random.default_rng(0)
    n, k, m, n_subsets = 40, 30, 8, 60
    scale = np.logspace(-2, 2, k)
    x = rng.normal(size=(n, k)) * scale
    xq = rng.normal(size=(m, k)) * scale
    masks = rng.random((n_subsets, n)) < 0.5
    lambdas = lambda_grid()[:12]
    return subset_predictions(x, xq, masks, lambdas), lambdas


def test_select_lambda_oracle_finds_constructed_lambda(grid_preds):
    preds, lambdas = grid_preds
    rng = np.random.default_rng(5)
    truth = preds[5] + 1e-9 * np.abs(preds[5]).mean() * rng.normal(size=preds[5].shape)
    direct = [lds(p, truth) for p in preds]
    assert np.argmax(direct) == 5 and sorted(direct)[-2] < direct[5] - 1e-3  # a unique best by construction
    got = select_lambda(preds, truth, lambdas, "oracle")
    assert got["lambda_"] == lambdas[5]
    assert got["lds"] == pytest.approx(direct[5], rel=1e-12)
    assert got["n_subsets"] == preds.shape[2] and got["n_queries"] == preds.shape[1]
    assert got["ci_low"] <= got["lds"] <= got["ci_high"]


def test_oracle_predictions_are_those_at_the_best_lambda_of_a_scipy_loop(grid_preds):
    """The lambda whose predictions have the highest mean scipy Spearman over queries, and
    select_lambda's oracle choice."""
    preds, lambdas = grid_preds
    truth = preds[7] + 0.3 * np.abs(preds[7]).mean() * np.random.default_rng(2).normal(size=preds[7].shape)
    by_scipy = [np.mean([stats.spearmanr(p[i], truth[i])[0] for i in range(len(truth))]) for p in preds]
    best = int(np.argmax(by_scipy))
    np.testing.assert_array_equal(oracle_predictions(preds, truth), preds[best])
    assert select_lambda(preds, truth, lambdas, "oracle")["lambda_"] == lambdas[best]


def test_select_lambda_heldout_selects_on_selection_half_only(grid_preds):
    preds, lambdas = grid_preds
    n_subsets = preds.shape[2]
    perm = np.random.default_rng(7).permutation(n_subsets)
    select, report = perm[: n_subsets // 2], perm[n_subsets // 2:]
    truth = np.empty(preds.shape[1:])
    truth[:, select] = preds[3][:, select]  # the selection half favours lambda index 3 ...
    truth[:, report] = preds[8][:, report]  # ... the report half index 8
    got = select_lambda(preds, truth, lambdas, "heldout", heldout_seed=7)
    on_select = [lds(p[:, select], truth[:, select]) for p in preds]
    best = int(np.argmax(on_select))
    assert best == 3
    assert got["lambda_"] == lambdas[best]
    assert got["lds"] == pytest.approx(lds(preds[best][:, report], truth[:, report]), rel=1e-12)
    assert got["lds"] < 1
    assert got["n_subsets"] == n_subsets - n_subsets // 2
    assert (got["ci_low"], got["ci_high"]) == lds_interval(preds[best][:, report], truth[:, report])


def test_select_lambda_unknown_rule(grid_preds):
    preds, lambdas = grid_preds
    with pytest.raises(ValueError, match="bestguess"):
        select_lambda(preds, preds[0], lambdas, "bestguess")


def test_lds_difference_interval_is_paired():
    """Two methods whose own intervals overlap widely, because every subset's truth carries a large
    shared disturbance: resampled together, their difference has a tight interval above 0."""
    rng = np.random.default_rng(1)
    m, n_subsets = 30, 24
    signal = rng.normal(size=(m, n_subsets))
    truth = signal + 1.5 * rng.normal(size=(1, n_subsets)) * rng.uniform(0.5, 1.5, size=(m, 1))
    good = signal + 0.1 * rng.normal(size=(m, n_subsets))
    worse = signal + 0.8 * rng.normal(size=(m, n_subsets))
    diff, low, high = lds_difference_interval(good, worse, truth, seed=2)
    assert diff == pytest.approx(lds(good, truth) - lds(worse, truth), abs=1e-15)
    assert 0 < low < diff < high
    good_low, good_high = lds_interval(good, truth, seed=2)
    worse_low, worse_high = lds_interval(worse, truth, seed=2)
    assert good_low < worse_high  # unpaired, the intervals overlap: they order nothing
    assert high - low < 0.6 * min(good_high - good_low, worse_high - worse_low)
    same = lds_difference_interval(good, good, truth)
    assert same == (0.0, 0.0, 0.0)


def test_lds_difference_interval_of_two_runs_against_a_resample_loop():
    """Two runs, each with its own truth on the same subsets: the interval is the percentile of the
    per-resample differences, each run's LDS recomputed by scipy on the same resampled columns."""
    rng = np.random.default_rng(3)
    m, n_subsets, resamples = 8, 12, 200
    signal = rng.normal(size=(m, n_subsets))
    truth_a = signal + 0.5 * rng.normal(size=(m, n_subsets))
    truth_b = signal + 0.5 * rng.normal(size=(m, n_subsets))
    pred_a, pred_b = signal + 0.3 * rng.normal(size=(m, n_subsets)), signal + rng.normal(size=(m, n_subsets))
    diff, low, high = lds_difference_interval(pred_a, pred_b, truth_a, n_resamples=resamples, truth_b=truth_b)
    assert diff == pytest.approx(lds(pred_a, truth_a) - lds(pred_b, truth_b), abs=1e-15)
    assert diff != pytest.approx(lds(pred_a, truth_a) - lds(pred_b, truth_a), abs=1e-3)  # truth_b is used
    columns = np.random.default_rng(0).integers(0, n_subsets, size=(resamples, n_subsets))
    loop = [np.nanmean(loop_spearman(pred_a[:, c], truth_a[:, c])) - np.nanmean(loop_spearman(pred_b[:, c], truth_b[:, c]))
            for c in columns]
    # scipy's resamples are its own: compare the interval to the loop's spread, not draw by draw
    assert np.quantile(loop, 0.01) < low < diff < high < np.quantile(loop, 0.99)
    assert lds_difference_interval(pred_a, pred_b, truth_a, n_resamples=resamples) != (diff, low, high)
    with pytest.raises(ValueError, match="truth_b"):
        lds_difference_interval(pred_a, pred_b, truth_a, truth_b=truth_b[:, :5])
