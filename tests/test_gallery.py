"""Attribution galleries: the scores of registered methods over singleton subsets against dense
references, and the ranking of training images they give."""
import numpy as np
import pytest

from diffattr.gallery import rank
from diffattr.score import scores as dense_kernel_scores, singleton_scores


def test_an_exact_copy_of_a_training_image_is_its_top_proponent():
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, size=(30, 1, 6, 6))
    query = train[[7, 12]].copy()
    entries = rank(singleton_scores("pixel_cos", train, query), "Raw pixel (cos)", top=5)
    assert [e.proponents[0] for e in entries] == [7, 12]
    assert entries[0].proponent_scores[0] == pytest.approx(1.0)
    # TRAK on features with more columns than rows: the kernel projects onto the train rows, so the
    # copy of row 7 scores 1 with itself and about 0 with every other row
    features = rng.normal(size=(20, 64))
    scores = singleton_scores("trak", features, features[[7]], lam=1e-6)
    assert rank(scores, "TRAK")[0].proponents[0] == 7
    assert scores[0, 7] == pytest.approx(1.0, abs=1e-4) and np.abs(np.delete(scores[0], 7)).max() < 1e-4


@pytest.mark.parametrize("method", ["trak", "relative_if", "renormalized_if", "gradient_cos", "pixel_dot"])
@pytest.mark.parametrize("n, k", [(25, 8), (8, 25)])
def test_scores_equal_a_dense_reference(method, n, k):
    rng = np.random.default_rng(n * k)
    train, query, lam = rng.normal(size=(n, k)), rng.normal(size=(3, k)), 0.5
    got = singleton_scores(method, train, query, lam=lam)
    h = train.T @ train + lam * np.eye(k)
    reference = np.zeros((3, n))
    for z in range(3):
        for i in range(n):
            if method == "trak":
                reference[z, i] = query[z] @ np.linalg.solve(h, train[i])
            elif method == "relative_if":
                reference[z, i] = query[z] @ np.linalg.solve(h, train[i]) / np.linalg.norm(np.linalg.solve(h, train[i]))
            elif method == "renormalized_if":
                reference[z, i] = query[z] @ np.linalg.solve(h, train[i]) / np.linalg.norm(train[i])
            elif method == "gradient_cos":
                reference[z, i] = query[z] @ train[i] / np.linalg.norm(query[z]) / np.linalg.norm(train[i])
            else:
                reference[z, i] = query[z] @ train[i]
    np.testing.assert_allclose(got, reference, rtol=1e-8, atol=1e-10)
    if method == "trak":
        np.testing.assert_allclose(got, dense_kernel_scores(train, query, lam), rtol=1e-8)


def test_gallery_order_is_the_scores_order():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(4, 40))
    scores[0, [3, 9]] = scores[0].max() + 1  # a tie: the lower position first
    for row, entry in zip(scores, rank(scores, "m", top=6)):
        assert list(entry.proponent_scores) == sorted(row, reverse=True)[:6]
        assert list(entry.opponent_scores) == sorted(row)[:6]
        assert list(row[entry.proponents]) == list(entry.proponent_scores)
        assert list(row[entry.opponents]) == list(entry.opponent_scores)
    assert list(rank(scores, "m")[0].proponents[:2]) == [3, 9]
