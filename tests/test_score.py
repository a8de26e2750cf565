import numpy as np
import pytest

from diffattr.score import lambda_grid, scores, subset_predictions


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
