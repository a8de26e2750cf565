"""K-FAC / EK-FAC influence (diffattr.kfac) against dense float64 computations."""
import numpy as np
import pytest
import torch

from diffattr import kfac


def _dense_basis(layer):
    """Q = Q_B (x) Q_A: vec(Q_B^T W Q_A) = Q^T vec(W) for row-major vec."""
    return torch.kron(layer["qb"], layer["qa"])


@pytest.fixture
def linear_case():
    """One Linear layer without bias (K-FAC is then the exact GGN of the MSE loss), float64."""
    torch.manual_seed(0)
    d_in, d_out, n = 4, 3, 40
    layer = torch.nn.Linear(d_in, d_out, bias=False).double()
    x, y = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    batches = [(x[i:i + 10], None) for i in range(0, n, 10)]
    layers = kfac.fit_factors(layer, [("weight", layer.weight)], batches, n, fisher="type-2")
    # the GGN of the per-row loss mean_j (f_j - y_j)^2, averaged over rows: J^T (2 / d_out) J
    jac = torch.stack([torch.kron(torch.eye(d_out, dtype=torch.float64), row[None]) for row in x])  # (n, d_out, p)
    ggn = torch.einsum("nop,noq->pq", jac, jac) * 2 / d_out / n

    def grads(inputs, targets):  # per-row gradients of the loss, (rows, d_out, d_in)
        return torch.stack([torch.outer(2 * (layer(a) - b) / d_out, a) for a, b in zip(inputs, targets)]).detach()

    return layer, layers[0], ggn, grads(x, y), grads(torch.randn(6, d_in, dtype=torch.float64),
                                                      torch.randn(6, d_out, dtype=torch.float64))


def test_kfac_of_one_linear_layer_is_the_exact_ggn(linear_case):
    _, layer, ggn, _, _ = linear_case
    q = _dense_basis(layer)
    dense_kfac = q @ torch.diag(layer["eigenvalues"]["kfac"]["weight"].flatten()) @ q.T
    torch.testing.assert_close(dense_kfac, ggn, rtol=1e-10, atol=1e-12)


def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kfac_eigenbasis(linear_case):
    _, layer, ggn, _, _ = linear_case
    q = _dense_basis(layer)
    torch.testing.assert_close(layer["eigenvalues"]["ekfac"]["weight"].flatten(), torch.diag(q.T @ ggn @ q),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_scores_equal_the_dense_inverse(linear_case, damping):
    """The method's subset predictions equal -sum_{i in S_j} g_q^T (G + damping I)^-1 g_i, dense."""
    _, layer, ggn, train, query = linear_case
    features = {}
    for name, grads in (("train", train), ("query", query)):
        rotated = kfac.rotate([layer], {"weight": grads})
        features[name] = np.stack([kfac.precondition([layer], rotated, v, damping).numpy()[None]
                                   for v in kfac.VARIANTS])
    masks = np.random.default_rng(0).random((5, len(train))) < 0.5
    job = kfac.InfluenceJob(features["train"], features["query"], masks, [damping])
    inverse = torch.linalg.inv(ggn + damping * torch.eye(len(ggn), dtype=torch.float64))
    dense = (query.flatten(1) @ inverse @ train.flatten(1).T).numpy()
    np.testing.assert_allclose(job.influence("kfac")[0], -dense @ masks.T, rtol=1e-9, atol=1e-12)
    # EK-FAC: the same with diag(Q^T G Q) in Q's basis
    q = _dense_basis(layer)
    ekfac = q @ torch.diag(torch.diag(q.T @ ggn @ q)) @ q.T
    inverse = torch.linalg.inv(ekfac + damping * torch.eye(len(ggn), dtype=torch.float64))
    dense = (query.flatten(1) @ inverse @ train.flatten(1).T).numpy()
    np.testing.assert_allclose(job.influence("ekfac")[0], -dense @ masks.T, rtol=1e-9, atol=1e-12)


def _apply(layers, variant, vectors):
    """Each layer's approximation times a vector per parameter: Q diag(e) Q^T v (basis-independent)."""
    out = []
    for layer in layers:
        for kind in ("weight", "bias"):
            if kind not in layer["names"]:
                continue
            v, e, qb = vectors[layer["names"][kind]], layer["eigenvalues"][variant][kind], layer["qb"]
            if kind == "weight":
                r = qb.T @ v.flatten(1) @ layer["qa"]
                out.append(qb @ (r * e) @ layer["qa"].T)
            else:
                out.append(qb @ ((qb.T @ v) * e))
    return out


def test_unet_factors_do_not_depend_on_batch_size(make_tiny_model, tiny_images):
    """Each image's draws are its own (not its batch's): batches of 3 and of 10 give one GGN. The
    Monte-Carlo vectors are drawn per image too."""
    model = make_tiny_model(0, torch.float64)
    images = np.concatenate([tiny_images, -tiny_images]).astype(np.float64)
    fits = [kfac.diffusion_factors(model, images, None, samples=2, seed=3, batch_size=b, fisher="mc")
            for b in (3, 10)]
    params = dict(kfac.curvature_parameters(model.network()))
    assert [layer["names"] for layer in fits[0]] == [layer["names"] for layer in fits[1]]
    assert {name for layer in fits[0] for name in layer["names"].values()} == set(params)
    torch.manual_seed(0)
    vectors = {name: torch.randn_like(p) for name, p in params.items()}
    for variant in kfac.VARIANTS:
        for a, b in zip(*(_apply(layers, variant, vectors) for layers in fits)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_duplicated_train_image_is_the_most_influential(make_tiny_model):
    """The query is train image 7 itself (same noise, as a row of the train features): its own
    train image ranks first among images of another kind, under both variants."""
    model = make_tiny_model(1)
    rng = np.random.default_rng(0)
    images = (0.3 * rng.standard_normal((12, 1, 8, 8))).astype(np.float32)
    images[7] = np.where(np.indices((8, 8)).sum(0) % 2, 1.0, -1.0)  # a checkerboard among noise images
    layers = kfac.diffusion_factors(model, images, None, samples=2, seed=0, batch_size=12)
    model.for_per_sample_gradients()
    features = kfac.influence_features(model, layers, images, "simple", [100, 400, 700], 0, [1e-3],
                                       kfac.Identity(), 12)
    for v, variant in enumerate(kfac.VARIANTS):
        scores = features[v, 0] @ features[v, 0, 7]
        assert np.argmax(scores) == 7, (variant, scores)


def test_factors_equal_curvlinops(make_tiny_model, tiny_images):
    """The hand-written K-FAC expand / EK-FAC equal curvlinops' operators (the library is not a
    dependency: its backpack-for-pytorch requires torchvision, see docs/methods.md)."""
    curvlinops = pytest.importorskip("curvlinops")
    model = make_tiny_model(2, torch.float64)
    images = tiny_images[:4].astype(np.float64)
    ours = kfac.diffusion_factors(model, images, None, samples=1, seed=0, batch_size=4, fisher="type-2")
    named = kfac.curvature_parameters(model.network())
    batch, _ = next(iter(kfac.Draws(model, torch.from_numpy(images), None, 1, 0, 4)))
    data = [(batch, torch.zeros(4, images[0].size, dtype=torch.float64))]
    torch.manual_seed(0)
    vectors = {name: torch.randn_like(p) for name, p in named}
    flat = torch.cat([vectors[name].flatten() for name, _ in named])
    for variant, operator in (("kfac", curvlinops.KFACLinearOperator), ("ekfac", curvlinops.EKFACLinearOperator)):
        theirs = operator(kfac._Regression(model), torch.nn.MSELoss(), [p for _, p in named], data,
                          fisher_type="type-2", kfac_approx="expand", num_per_example_loss_terms=1, num_data=4,
                          check_deterministic=False, batch_size_fn=lambda b: len(b["x_t"]))
        expected = dict(zip([name for name, _ in named], (theirs @ flat).split([p.numel() for _, p in named])))
        mine = _apply(ours, variant, vectors)
        order = [layer["names"][kind] for layer in ours for kind in ("weight", "bias") if kind in layer["names"]]
        for name, value in zip(order, mine):
            torch.testing.assert_close(value.flatten(), expected[name], rtol=1e-8, atol=1e-12)


def test_score_job_reads_its_stores_and_refuses_another_curvature(tmp_path):
    """score_influence: the stores' dot products as subset predictions per variant and damping, and
    a refusal when the query features were preconditioned with another curvature."""
    import pandas as pd

    from diffattr.methods import read_predictions
    from diffattr.provenance import ProvenanceError
    from diffattr.storage import write_array

    rng = np.random.default_rng(0)
    train, query = rng.standard_normal((2, 2, 6, 5)), rng.standard_normal((2, 2, 3, 5))
    attrs = {"model_sha256": "m", "curvature_sha256": "c", "curvature": {}, "dampings": [1e-8, 1.0],
             "variants": list(kfac.VARIANTS), "K": 2, "timesteps": [0, 500], "noise_seed": 0, "proj_dim": 5,
             "projector": "none", "grad_dim": 5, "query_sha256": "q"}
    write_array(tmp_path / "train.zarr", train, {**attrs, "function": "simple"})
    write_array(tmp_path / "query.zarr", query, {**attrs, "function": "square"})
    masks = rng.random((4, 6)) < 0.5
    pd.DataFrame([{"subset": j, "train_position": i} for j, i in zip(*np.nonzero(masks))]).to_csv(
        tmp_path / "subsets.csv", index=False)
    kfac.score_influence(tmp_path / "train.zarr", tmp_path / "query.zarr", tmp_path / "subsets.csv",
                         ["kfac_influence", "ekfac_influence"], tmp_path / "scores.zarr")
    preds, stored = read_predictions(tmp_path / "scores.zarr")
    assert stored["function"] == "square"
    for v, method in enumerate(["kfac_influence", "ekfac_influence"]):
        expected = np.stack([-(query[v, l] @ train[v, l].T) @ masks.T for l in range(2)])
        np.testing.assert_allclose(preds[method][0], expected, rtol=1e-6)
        np.testing.assert_array_equal(preds[method][1], [1e-8, 1.0])
    write_array(tmp_path / "query.zarr", query, {**attrs, "function": "square", "curvature_sha256": "other"})
    with pytest.raises(ProvenanceError, match="curvature_sha256"):
        kfac.score_influence(tmp_path / "train.zarr", tmp_path / "query.zarr", tmp_path / "subsets.csv",
                             ["kfac_influence"], tmp_path / "scores2.zarr")



def test_influence_features_take_the_featurizers_arithmetic(make_tiny_model, tiny_spec, tiny_images, tmp_path):
    """featurize.dtype reaches the influence features: the store records `arithmetic` (fp32 when the
    spec has none), tf32's rows are fp32's bitwise on a CPU, bf16 is refused, and the score job refuses
    a train / query mix in one line, reading a store without the attribute (written before
    featurize.dtype) as fp32."""
    import pandas as pd

    from diffattr.methods import read_predictions
    from diffattr.provenance import ProvenanceError
    from diffattr.storage import read_array, write_array

    make_tiny_model(1).save(tmp_path / "model")
    weights = tmp_path / "model" / "diffusion_pytorch_model.safetensors"
    write_array(tmp_path / "images.zarr", tiny_images, {})
    kfac.compute_curvature(weights, tiny_spec, tmp_path / "images.zarr",
                           {"samples": 2, "seed": 0, "batch_size": 5, "fisher": "mc"}, tmp_path / "curvature.pt")
    spec = {"dampings": [1e-3], "proj_dim": 8, "batch_size": 5, "proj_seed": 0, "noise_seed": 0}
    stores = {}
    for name, extra in (("absent", {}), ("tf32", {"dtype": "tf32"})):
        kfac.write_influence_features(weights, tiny_spec, tmp_path / "images.zarr", tmp_path / "curvature.pt",
                                      "simple", [100, 700], {**spec, **extra}, tmp_path / f"{name}.zarr")
        stores[name] = read_array(tmp_path / f"{name}.zarr")
    assert (stores["absent"][1]["arithmetic"], stores["tf32"][1]["arithmetic"]) == ("fp32", "tf32")
    np.testing.assert_array_equal(stores["tf32"][0], stores["absent"][0])
    with pytest.raises(ValueError, match=r"^featurize.dtype: got 'bf16'"):
        kfac.write_influence_features(weights, tiny_spec, tmp_path / "images.zarr", tmp_path / "curvature.pt",
                                      "simple", [100], {**spec, "dtype": "bf16"}, tmp_path / "bf16.zarr")

    pd.DataFrame({"subset": [0, 0, 1], "train_position": [0, 2, 4]}).to_csv(tmp_path / "subsets.csv", index=False)
    old = {key: value for key, value in stores["absent"][1].items() if key != "arithmetic"}
    write_array(tmp_path / "old.zarr", stores["absent"][0], old)  # a train store from before featurize.dtype
    kfac.score_influence(tmp_path / "old.zarr", tmp_path / "absent.zarr", tmp_path / "subsets.csv",
                         ["kfac_influence"], tmp_path / "scores.zarr")
    assert "kfac_influence" in read_predictions(tmp_path / "scores.zarr")[0]
    with pytest.raises(ProvenanceError) as error:
        kfac.score_influence(tmp_path / "old.zarr", tmp_path / "tf32.zarr", tmp_path / "subsets.csv",
                             ["kfac_influence"], tmp_path / "scores2.zarr")
    assert str(error.value) == (f"{tmp_path / 'old.zarr'} and {tmp_path / 'tf32.zarr'} disagree on arithmetic "
                                "('fp32' vs 'tf32')")
