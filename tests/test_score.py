import numpy as np
import pytest

from diffattr import score
from diffattr.protocol import lambda_grid
from diffattr.methods import predictions
from diffattr.score import FeatureJob, scores, subset_predictions


def explicit_scores(x, xq, lam):
    return xq @ np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1])) @ x.T


def loop_predictions(x, xq, masks, lambdas):
    """Reference: explicit inverse, then sum S[z, i] over each subset's members one by one."""
    out = np.zeros((len(lambdas), xq.shape[0], masks.shape[0]))
    for l, lam in enumerate(lambdas):
        s = explicit_scores(x, xq, lam)
        for z in range(xq.shape[0]):
            for j in range(masks.shape[0]):
                out[l, z, j] = -sum(s[z, i] for i in range(x.shape[0]) if masks[j, i])
    return out


def data(n, k, m=4, n_subsets=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k))
    xq = rng.normal(size=(m, k))
    masks = rng.random((n_subsets, n)) < 0.5
    return x, xq, masks


@pytest.mark.parametrize("n,k", [(20, 5), (6, 15)])
def test_scores_match_explicit_inverse(n, k):
    x, xq, _ = data(n, k)
    for lam in (0.05, 3.0):
        np.testing.assert_allclose(scores(x, xq, lam), explicit_scores(x, xq, lam), rtol=1e-8)


@pytest.mark.parametrize("n,k", [(20, 5), (6, 15)])  # eig of X^T X, then Gram branch
def test_subset_predictions_match_loop(n, k):
    x, xq, masks = data(n, k)
    lambdas = [0.01, 0.5, 20.0, 1e4]
    got = subset_predictions(x, xq, masks, lambdas)
    assert got.shape == (len(lambdas), xq.shape[0], masks.shape[0])
    np.testing.assert_allclose(got, loop_predictions(x, xq, masks, lambdas), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("n,k", [(20, 6), (5, 12)])
def test_subset_predictions_rank_deficient(n, k):
    x, xq, masks = data(n, k, seed=1)
    x[:, 1] = x[:, 0]  # duplicate columns make X^T X singular ...
    x[:, -1] = 2 * x[:, 0]
    x[-1] = x[0]  # ... and a duplicate row makes the Gram matrix X X^T singular
    lambdas = [0.1, 1.0, 5e6]
    got = subset_predictions(x, xq, masks, lambdas)
    want = loop_predictions(x, xq, masks, lambdas)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)
    # at a huge lambda the scores are ~ Xq X^T / lambda
    approx = -(xq @ x.T @ masks.T) / 5e6
    np.testing.assert_allclose(got[-1], approx, atol=1e-4 * np.abs(approx).max())


def test_subset_predictions_validates_shapes():
    x, xq, masks = data(10, 4)
    with pytest.raises(ValueError, match="k=4"):
        subset_predictions(x, xq[:, :3], masks, [1.0])
    with pytest.raises(ValueError, match="masks"):
        subset_predictions(x, xq, masks[:, :9], [1.0])
    with pytest.raises(ValueError, match="positive"):
        subset_predictions(x, xq, masks, [1.0, 0.0])


def test_lambda_grid():
    grid = lambda_grid()
    assert len(grid) == 27
    assert grid[0] == 0.01 and grid[-1] == 5e6
    assert grid[:4] == [0.01, 0.02, 0.05, 0.1]
    assert all(a < b for a, b in zip(grid, grid[1:]))


# ---------------------------------------------------------------- the other methods, against dense references

def dense_method_scores(method, x, xq, lam):
    """The (m, n) score matrix of a method, column by column from a dense inverse and explicit norms."""
    n, k = x.shape
    if method in ("gradient_dot", "pixel_dot"):
        return np.array([[xq[z] @ x[i] for i in range(n)] for z in range(len(xq))])
    if method in ("gradient_cos", "pixel_cos"):
        return np.array([[xq[z] @ x[i] / (np.linalg.norm(xq[z]) * np.linalg.norm(x[i])) for i in range(n)]
                         for z in range(len(xq))])
    h_inv = np.linalg.inv(x.T @ x + lam * np.eye(k))
    out = np.zeros((len(xq), n))
    for i in range(n):
        column = xq @ h_inv @ x[i]
        if method == "relative_if":
            column = column / np.linalg.norm(h_inv @ x[i])
        elif method == "renormalized_if":
            column = column / np.linalg.norm(x[i])
        out[:, i] = column
    return out


def method_predictions(method, x, xq, masks, lambdas):
    """One method's (predictions, lambdas) as the score job computes them, through the registry."""
    return predictions([method], FeatureJob(x, xq, masks, lambdas, {}))[method]


def loop_method_predictions(method, x, xq, masks, lambdas):
    out = np.zeros((len(lambdas), len(xq), len(masks)))
    for l, lam in enumerate(lambdas):
        s = dense_method_scores(method, x, xq, lam)
        for z in range(len(xq)):
            for j in range(len(masks)):
                out[l, z, j] = -sum(s[z, i] for i in range(len(x)) if masks[j, i])
    return out


@pytest.mark.parametrize("n,k", [(20, 5), (6, 15)])  # eig of X^T X, then Gram branch
@pytest.mark.parametrize("method", ["trak", "relative_if", "renormalized_if"])
@pytest.mark.parametrize("block", [4096, 3])  # RelatIF's norms in one block of rows, or in several
def test_kernel_methods_match_dense_inverse(method, n, k, block, monkeypatch):
    monkeypatch.setattr(score, "NORM_BLOCK_ROWS", block)
    x, xq, masks = data(n, k, seed=2)
    x *= np.linspace(0.2, 3.0, n)[:, None]  # train rows of different norms: the rescalings matter
    lambdas = [0.01, 0.5, 20.0, 1e4]
    got, got_lambdas = method_predictions(method, x, xq, masks, lambdas)
    assert got_lambdas == lambdas
    np.testing.assert_allclose(got, loop_method_predictions(method, x, xq, masks, lambdas), rtol=1e-8,
                               atol=1e-12)


@pytest.mark.parametrize("n,k", [(20, 5), (6, 15)])
@pytest.mark.parametrize("method", ["gradient_dot", "gradient_cos", "pixel_dot", "pixel_cos"])
def test_dot_methods_match_loops(method, n, k):
    x, xq, masks = data(n, k, seed=3)
    x *= np.linspace(0.2, 3.0, n)[:, None]
    got, lambdas = method_predictions(method, x, xq, masks, [1.0, 2.0])
    assert lambdas == [None] and got.shape == (1, len(xq), len(masks))
    np.testing.assert_allclose(got, loop_method_predictions(method, x, xq, masks, [None]), rtol=1e-10,
                               atol=1e-12)


def test_rescaled_methods_differ_from_trak():
    """Rows of very different norms: dividing by them changes which subsets rank first."""
    x, xq, masks = data(20, 5, seed=4)
    x *= np.logspace(-1, 1, 20)[:, None]
    preds = {m: method_predictions(m, x, xq, masks, [0.1])[0] for m in ("trak", "relative_if", "renormalized_if")}
    assert not np.allclose(preds["trak"], preds["relative_if"])
    assert not np.allclose(preds["trak"], preds["renormalized_if"])
    assert not np.allclose(preds["relative_if"], preds["renormalized_if"])


@pytest.mark.parametrize("n,k", [(12, 4), (5, 9)])
def test_relative_if_zero_train_row_scores_zero(n, k):
    x, xq, masks = data(n, k, seed=5)
    x[2] = 0.0
    for method in ("relative_if", "renormalized_if", "gradient_cos"):
        got = method_predictions(method, x, xq, masks, [0.3])[0]
        alone = np.zeros_like(masks)
        alone[:, 2] = True  # subsets holding only the zero row
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(method_predictions(method, x, xq, alone, [0.3])[0], 0.0)


def test_unknown_method_is_named():
    x, xq, masks = data(10, 4)
    with pytest.raises(ValueError, match="'tracin'"):
        method_predictions("tracin", x, xq, masks, [1.0])
    with pytest.raises(ValueError, match="renormalize"):
        subset_predictions(x, xq, masks, [1.0], renormalize="cosine")


@pytest.mark.parametrize("n,k", [(20, 5), (6, 15)])
def test_score_split_decomposes_once_for_every_kernel_method(n, k, monkeypatch):
    """The score job's kernel methods share one eigendecomposition and give what each gives alone."""
    x, xq, masks = data(n, k)
    lambdas = [0.1, 2.0]
    calls = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(score.np.linalg, "eigh", lambda a: calls.append(a.shape) or eigh(a))
    kernel = {"trak": None, "relative_if": "relative", "renormalized_if": "renormalized"}
    together = predictions(list(kernel), FeatureJob(x, xq, masks, lambdas, {}))
    assert len(calls) == 1
    for method, renormalize in kernel.items():
        np.testing.assert_array_equal(together[method][0], subset_predictions(x, xq, masks, lambdas, renormalize))
