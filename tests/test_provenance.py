"""Provenance guard: scoring and the LDS refuse features, scores and ground truth that do not belong
together, naming the files and the attributes that differ; nothing is written when they refuse."""
import numpy as np
import pandas as pd
import pytest
import zarr

from diffattr.protocol import FeatureSet, select_timesteps
from diffattr.featurize import featurize_split
from diffattr.ground_truth import compute_and_save
from diffattr.lds import lds_table, select_lambda
from diffattr.methods import METHODS, methods_reading, read_predictions, write_predictions
from diffattr.provenance import FEATURE_KEYS, ProvenanceError
from diffattr.protocol import lambda_grid
from diffattr.score import score_split, subset_predictions
from diffattr.storage import array_sha256, file_sha256, read_array, write_array
from diffattr.subsets import make_subsets, membership_matrix

SCORE_SPEC = {"lambda_exponents": [-1, 1]}
LDS_SPEC = {"lambda_rules": ["oracle"], "confidence": 0.9, "bootstrap_resamples": 50, "heldout_seed": 0}


@pytest.fixture
def subsets_csv(tmp_path):
    path = tmp_path / "subsets.csv"
    make_subsets(np.arange(12) % 2, 4, 0.5, 42).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------- features -> scores

@pytest.fixture
def saved_model(make_tiny_model, tmp_path):
    directory = tmp_path / "model"
    make_tiny_model(0).save(directory)
    return directory / "diffusion_pytorch_model.safetensors"


def featurize(weights, spec, images_path, proj_seed, out):
    featurize_split(weights, spec, images_path, "square", select_timesteps(2, "uniform"), 16,
                    {"batch_size": 4, "proj_seed": proj_seed, "scheme": "uniform", "noise_seed": 0}, out)
    return out


def test_features_of_two_projector_seeds_are_refused(saved_model, tiny_spec, subsets_csv, tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 3)):
        write_array(tmp_path / f"{split}.zarr", rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32), {})
    train = featurize(saved_model, tiny_spec, tmp_path / "train.zarr", 0, tmp_path / "f0" / "train.zarr")
    query = featurize(saved_model, tiny_spec, tmp_path / "val.zarr", 0, tmp_path / "f0" / "val.zarr")
    other = featurize(saved_model, tiny_spec, tmp_path / "val.zarr", 1, tmp_path / "f1" / "val.zarr")
    # the seeds really give other features: mixing them would silently give wrong scores
    assert not np.allclose(read_array(query)[0], read_array(other)[0])

    out = tmp_path / "scores" / "val.zarr"
    with pytest.raises(ProvenanceError) as error:
        score_split(train, other, subsets_csv, SCORE_SPEC, out)
    assert str(error.value) == f"{train} and {other} cannot be combined; they differ in proj_seed: 0 vs 1"
    assert not out.parent.exists()

    score_split(train, query, subsets_csv, SCORE_SPEC, out, "val")  # one seed: accepted, right scores
    predictions, attrs = read_predictions(out)
    # every method that applies to square features on val when the spec names none
    assert list(predictions) == [m for m in methods_reading("features")
                                 if METHODS[m].applies(FeatureSet("square", 2, 16), "val")]
    assert "trak" in predictions and "journey_trak" not in predictions and "das" not in predictions
    preds, lambdas = predictions["trak"]
    masks = membership_matrix(pd.read_csv(subsets_csv), 12)
    expected = subset_predictions(read_array(train)[0], read_array(query)[0], masks, lambda_grid((-1, 1)))
    np.testing.assert_allclose(preds, expected, rtol=1e-10)
    np.testing.assert_array_equal(lambdas, lambda_grid((-1, 1)))
    assert attrs["proj_seed"] == 0 and attrs["subsets_sha256"] == file_sha256(subsets_csv)


FEATURE_ATTRS = {"model_sha256": "a" * 64, "checkpoint": None, "function": "square", "K": 2, "timesteps": [0, 500],
                 "scheme": "uniform", "noise_seed": 0, "dtype": "float32", "arithmetic": "fp32",
                 "projector": "CudaProjector",
                 "proj_dim": 4, "proj_seed": 0, "proj_type": "normal", "grad_dim": 100, "block_size": None,
                 "gpu": "NVIDIA H100 80GB HBM3", "sm_count": 132, "device": "NVIDIA H100 80GB HBM3",
                 "noises": 1, "query_sha256": "b" * 64,
                 "factor_split": None, "factor_sides": None, "factorized_layers": None, "dense_dim": None, "dense": None}
# The disagreement the issue lists, and the value the query store has instead.
DISAGREEMENTS = [("model_sha256", "c" * 64), ("checkpoint", 100), ("function", "simple"), ("K", 3), ("timesteps", [0, 250]),
                 ("scheme", "cumulative"), ("noise_seed", 1), ("dtype", "bfloat16"), ("arithmetic", "tf32"),
                 ("projector", "BasicProjector"), ("proj_seed", 7), ("proj_type", "rademacher"),
                 ("grad_dim", 101), ("gpu", "NVIDIA A100-SXM4-80GB"), ("sm_count", 108),
                 ("device", "cpu"), ("noises", 2), ("factor_split", "even"),
                 ("factor_sides", [3, 2]), ("factorized_layers", 5),
                 ("dense_dim", 10), ("dense", {"projector": "BasicProjector", "block_size": 4})]


def stores(tmp_path, query_change: dict, train_attrs=FEATURE_ATTRS, query_rows=None):
    rng = np.random.default_rng(1)
    train = tmp_path / "train.zarr"
    query = tmp_path / "val.zarr"
    write_array(train, rng.normal(size=(12, 4)).astype(np.float32), train_attrs)
    rows = rng.normal(size=(3, 4)).astype(np.float32) if query_rows is None else query_rows
    write_array(query, rows, {**FEATURE_ATTRS, **query_change})
    return train, query


def test_every_listed_disagreement_is_a_feature_key():
    assert {key for key, _ in DISAGREEMENTS} | {"proj_dim", "block_size"} == set(FEATURE_KEYS)


@pytest.mark.parametrize("key, value", DISAGREEMENTS)
def test_features_that_disagree_are_refused(key, value, subsets_csv, tmp_path):
    train, query = stores(tmp_path, {key: value})
    out = tmp_path / "scores.zarr"
    with pytest.raises(ProvenanceError) as error:
        score_split(train, query, subsets_csv, SCORE_SPEC, out)
    assert str(error.value) == (f"{train} and {query} cannot be combined; they differ in "
                                f"{key}: {FEATURE_ATTRS[key]!r} vs {value!r}")
    assert not out.exists()


@pytest.mark.parametrize("train_attrs, query_change, query_rows, message", [
    ({}, {}, None, "{train} records no model_sha256, function, K, timesteps, projector, proj_dim, proj_seed, "
                   "query_sha256: it was not written by diffattr's featurize (or by an older version); "
                   "recompute it"),
    (FEATURE_ATTRS, {"proj_dim": 8}, None, "{query}: features of shape (3, 4), but its proj_dim is 8"),
    (FEATURE_ATTRS, {}, np.array([[0, 1, 2, 3], [0, np.nan, 0, 0], [0, 0, 0, np.inf]], np.float32),
     "{query} holds 2 non-finite values (first at [1, 1]); recompute it"),
], ids=["no provenance", "proj_dim not the shape", "non-finite"])
def test_untrustworthy_feature_stores_are_refused(train_attrs, query_change, query_rows, message,
                                                  subsets_csv, tmp_path):
    train, query = stores(tmp_path, query_change, train_attrs, query_rows)
    with pytest.raises(ProvenanceError) as error:
        score_split(train, query, subsets_csv, SCORE_SPEC, tmp_path / "scores.zarr")
    assert str(error.value) == message.format(train=train, query=query)


def test_a_store_from_before_featurize_dtype_reads_as_fp32(subsets_csv, tmp_path):
    """A feature store written before featurize.dtype records no `arithmetic`: it is fp32's, scored
    with an fp32 store (the predictions record fp32) and refused with a tf32 one, in one line."""
    old = {key: value for key, value in FEATURE_ATTRS.items() if key != "arithmetic"}
    train, query = stores(tmp_path, {}, old)
    out = tmp_path / "scores.zarr"
    score_split(train, query, subsets_csv, {**SCORE_SPEC, "methods": ["trak"]}, out)
    assert read_predictions(out)[1]["arithmetic"] == "fp32"
    train, query = stores(tmp_path, {"arithmetic": "tf32"}, old)
    with pytest.raises(ProvenanceError) as error:
        score_split(train, query, subsets_csv, SCORE_SPEC, tmp_path / "scores2.zarr")
    assert str(error.value) == f"{train} and {query} cannot be combined; they differ in arithmetic: 'fp32' vs 'tf32'"


def test_features_of_two_arithmetics_are_refused(saved_model, tiny_spec, subsets_csv, tmp_path):
    """The real writer: train features in tf32, query features in fp32 (equal on a CPU, but not on a
    GPU) are not scored together; both in tf32 are."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 3)):
        write_array(tmp_path / f"{split}.zarr", rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32), {})
    spec = {"batch_size": 4, "proj_seed": 0, "scheme": "uniform", "noise_seed": 0}
    made = {}
    for name, split, dtype in (("train", "train", "tf32"), ("fp32", "val", "fp32"), ("tf32", "val", "tf32")):
        made[name] = tmp_path / dtype / f"{split}.zarr"
        featurize_split(saved_model, tiny_spec, tmp_path / f"{split}.zarr", "square", select_timesteps(2, "uniform"),
                        16, {**spec, "dtype": dtype}, made[name])
    out = tmp_path / "scores" / "val.zarr"
    with pytest.raises(ProvenanceError) as error:
        score_split(made["train"], made["fp32"], subsets_csv, SCORE_SPEC, out)
    assert str(error.value) == (f"{made['train']} and {made['fp32']} cannot be combined; they differ in "
                                "arithmetic: 'tf32' vs 'fp32'")
    assert not out.parent.exists()
    score_split(made["train"], made["tf32"], subsets_csv, {**SCORE_SPEC, "methods": ["trak"]}, out, "val")
    assert read_predictions(out)[1]["arithmetic"] == "tf32"


def test_subsets_of_another_train_set_are_refused(subsets_csv, tmp_path):
    train, query = stores(tmp_path, {})
    bigger = tmp_path / "bigger.csv"
    make_subsets(np.arange(20) % 2, 4, 0.5, 42).to_csv(bigger, index=False)
    top = pd.read_csv(bigger)["train_position"].max()
    with pytest.raises(ProvenanceError, match=rf"^{bigger} names train position {top}, but {train} has "
                                              r"features of 12 train images$"):
        score_split(train, query, bigger, SCORE_SPEC, tmp_path / "scores.zarr")


# ---------------------------------------------------------------- scores + ground truth -> LDS

MODELS = [f"s{j:03d}-r{r}" for j in range(4) for r in (0, 1)]
QUERIES = np.arange(3 * 64, dtype=np.float32).reshape(3, 1, 8, 8)


def write_truth(path, losses, model_sha256, query_sha256, **group_attrs):
    """A ground-truth store laid out as ground_truth.compute_and_save writes it."""
    group = zarr.open_group(path, mode="w")
    group.attrs.update({"model_sha256": model_sha256, "timesteps": list(range(0, 1000, 100)),
                        "noise_seeds": [0], "function": "simple", "dtype": "fp32", **group_attrs})
    array = group.create_array("val", shape=losses.shape, dtype=losses.dtype)
    array[...] = losses
    array.attrs["query_sha256"] = query_sha256


@pytest.fixture
def lds_inputs(subsets_csv, tmp_path):
    """Consistent scores and ground truth: 3 queries, 4 subsets x 2 seeds; `truth(j, r)` edits one."""
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(3, 4))
    preds = truth[None] + rng.normal(scale=[[[0.1]], [[1.0]], [[3.0]]], size=(3, 3, 4))
    query_sha256 = array_sha256(QUERIES)
    predictions = tmp_path / "scores" / "val.zarr"
    write_predictions(predictions, {"trak": (preds, [0.1, 1.0, 10.0])},
                      {"query_sha256": query_sha256, "subsets_sha256": file_sha256(subsets_csv),
                       "function": "square", "K": 10, "proj_dim": 4})
    paths = {}
    for name in MODELS:
        j, r = int(name[1:4]), int(name[-1])
        paths[name] = tmp_path / "gt" / f"{name}.zarr"
        # seed r = 0 and 1 around the subset's truth: their mean is exactly `truth`
        write_truth(paths[name], truth[:, j] + (0.5 if r else -0.5), f"{j}{r}" * 32, query_sha256)
    return predictions, paths, truth


def run_lds(lds_inputs, subsets_csv, tmp_path):
    predictions, paths, _ = lds_inputs
    out = tmp_path / "lds.csv"
    lds_table(predictions, subsets_csv, paths, "val", LDS_SPEC, out)
    return pd.read_csv(out)


def test_consistent_scores_and_ground_truth_give_the_lds(lds_inputs, subsets_csv, tmp_path):
    predictions, _, truth = lds_inputs
    preds, lambdas = read_predictions(predictions)[0]["trak"]
    expected = select_lambda(preds, truth, lambdas, "oracle", 0, 0.9, 50)
    row = run_lds(lds_inputs, subsets_csv, tmp_path).iloc[0]
    assert row["lambda"] == expected["lambda_"] == 0.1 and row["lds"] == pytest.approx(expected["lds"])


def rewrite(paths, name, change, query_sha256=None):
    group = zarr.open_group(paths[name], mode="r")
    attrs = {**dict(group.attrs), **change}
    losses = group["val"][...]
    write_truth(paths[name], losses, attrs.pop("model_sha256"),
                query_sha256 or group["val"].attrs["query_sha256"], **attrs)


OTHER_TABLE = "f" * 64


@pytest.mark.parametrize("case", ["timesteps", "noise_seeds", "dtype", "one model's query set", "query set",
                                  "scores' subsets table", "ground truth's subsets table", "subset",
                                  "same model twice", "no provenance"])
def test_ground_truth_that_does_not_belong_is_refused(case, lds_inputs, subsets_csv, tmp_path):
    predictions, paths, _ = lds_inputs
    first, s1 = paths["s000-r0"], paths["s001-r0"]
    table = file_sha256(subsets_csv)
    other_queries = array_sha256(QUERIES + 1)
    if case == "timesteps":
        rewrite(paths, "s001-r0", {"timesteps": list(range(0, 1000, 50))})
        message = (f"{first} and {s1} cannot be combined; they differ in timesteps: "
                   "[0, 100, 200, ..., 900] (10 values) vs [0, 50, 100, ..., 950] (20 values)")
    elif case == "noise_seeds":
        rewrite(paths, "s001-r0", {"noise_seeds": [0, 1]})
        message = f"{first} and {s1} cannot be combined; they differ in noise_seeds: [0] vs [0, 1]"
    elif case == "dtype":
        rewrite(paths, "s001-r0", {"dtype": "bf16"})
        message = f"{first} and {s1} cannot be combined; they differ in dtype: 'fp32' vs 'bf16'"
    elif case == "one model's query set":
        rewrite(paths, "s001-r0", {}, query_sha256=other_queries)
        message = (f"{first} and {s1} cannot be combined; they differ in query_sha256: "
                   f"'{array_sha256(QUERIES)}' vs '{other_queries}'")
    elif case == "query set":
        for name in MODELS:
            rewrite(paths, name, {}, query_sha256=other_queries)
        message = (f"{predictions} and the ground truth ({first}) were computed on different 'val' query "
                   f"sets (query_sha256 {array_sha256(QUERIES)} vs {other_queries})")
    elif case == "scores' subsets table":
        zarr.open_group(predictions, mode="r+").attrs["subsets_sha256"] = OTHER_TABLE
        message = (f"{predictions} was scored with another subsets table than {subsets_csv} "
                   f"(subsets_sha256 {OTHER_TABLE} vs {table})")
    elif case == "ground truth's subsets table":
        for name in MODELS:
            rewrite(paths, name, {"subsets_sha256": OTHER_TABLE})
        message = (f"{first}: its model was trained on another subsets table (subsets_sha256 "
                   f"{OTHER_TABLE}, table in use {table})")
    elif case == "subset":
        rewrite(paths, "s001-r0", {"subset": 2})
        message = f"{s1}: the ground truth of a model trained on subset 2, given as s001-r0's"
    elif case == "same model twice":
        rewrite(paths, "s001-r0", {"model_sha256": "00" * 32})
        message = (f"{s1} and {first} hold the ground truth of the same model (model_sha256 "
                   f"{'00' * 32}), not of s001-r0's own")
    else:
        group = zarr.open_group(paths["s000-r0"], mode="r+")
        group.attrs.update({"timesteps": None, "noise_seeds": None})
        message = (f"{first} (val) records no timesteps, noise_seeds: it was not written by diffattr's "
                   "ground_truth (or by an older version); recompute it")
    with pytest.raises(ProvenanceError) as error:
        run_lds(lds_inputs, subsets_csv, tmp_path)
    assert str(error.value) == message
    assert not (tmp_path / "lds.csv").exists()


def test_ground_truth_written_for_another_query_set_is_refused(make_tiny_model, tiny_spec, subsets_csv,
                                                               tmp_path):
    """The real writer: one model's ground truth computed on other queries is caught by its hash."""
    rng = np.random.default_rng(3)
    queries = {"val": rng.uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32)}
    write_array(tmp_path / "val.zarr", queries["val"], {})
    write_array(tmp_path / "val_other.zarr", queries["val"][::-1].copy(), {})
    gt_spec = {"timesteps": 2, "noise_seeds": [0], "batch_size": 16}
    paths = {}
    for k, name in enumerate(MODELS):
        make_tiny_model(k).save(tmp_path / "models" / name)
        images = tmp_path / ("val_other.zarr" if name == "s002-r1" else "val.zarr")
        paths[name] = tmp_path / "gt" / f"{name}.zarr"
        compute_and_save(tmp_path / "models" / name / "diffusion_pytorch_model.safetensors", tiny_spec,
                         {"val": images}, gt_spec, paths[name])
    predictions = tmp_path / "scores.zarr"
    write_predictions(predictions, {"trak": (np.zeros((2, 3, 4)), [0.1, 1.0])}, {
        "query_sha256": array_sha256(queries["val"]), "function": "square",
        "subsets_sha256": file_sha256(subsets_csv), "K": 2, "proj_dim": 4})
    with pytest.raises(ProvenanceError, match=rf"^{paths['s000-r0']} and {paths['s002-r1']} cannot be "
                                              r"combined; they differ in query_sha256: "):
        lds_table(predictions, subsets_csv, paths, "val", LDS_SPEC, tmp_path / "lds.csv")
    assert not (tmp_path / "lds.csv").exists()


def test_ground_truth_records_what_its_model_was_trained_on(tiny_spec, subsets_csv, tmp_path):
    """Training writes training.json beside the weights; the ground truth copies it, and the LDS
    refuses a store whose model was trained on another subsets table, subset or seed."""
    from diffattr.lds import ground_truth_matrix
    from diffattr.train import train_and_save

    rng = np.random.default_rng(1)
    write_array(tmp_path / "train.zarr", rng.uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32), {})
    write_array(tmp_path / "val.zarr", rng.uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32), {})
    train = {"batch_size": 4, "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "grad_clip": 1.0,
             "warmup_fraction": 0.0, "steps": 2, "model": tiny_spec}
    truth = {}
    for name in ("s000-r0", "s001-r0"):
        weights = tmp_path / name / "diffusion_pytorch_model.safetensors"
        train_and_save(tmp_path / "train.zarr", subsets_csv, int(name[1:4]), 0, train, weights)
        truth[name] = tmp_path / f"{name}.zarr"
        compute_and_save(weights, tiny_spec, {"val": tmp_path / "val.zarr"},
                         {"timesteps": 2, "noise_seeds": [0], "batch_size": 8}, truth[name])
    attrs = read_array(truth["s001-r0"] / "val")[1] | dict(zarr.open_group(truth["s001-r0"], mode="r").attrs)
    assert (attrs["subset"], attrs["train_seed"], attrs["subsets_sha256"]) == (1, 0, file_sha256(subsets_csv))

    table = file_sha256(subsets_csv)
    ground_truth_matrix(truth, "val", 2, table)  # as trained: accepted
    with pytest.raises(ProvenanceError, match="its model was trained on another subsets table"):
        ground_truth_matrix(truth, "val", 2, "0" * 64)
    swapped = {"s000-r0": truth["s001-r0"], "s001-r0": truth["s000-r0"]}
    with pytest.raises(ProvenanceError, match="trained on subset 1, given as s000-r0's"):
        ground_truth_matrix(swapped, "val", 2, table)
    with pytest.raises(ProvenanceError, match="trained with seed 0, given as s000-r1's"):
        ground_truth_matrix({"s000-r1": truth["s000-r0"], "s001-r0": truth["s001-r0"]}, "val", 2, table)


@pytest.mark.parametrize("case", ["one array", "no provenance", "no function", "unknown method",
                                  "missing member", "no lambdas"])
def test_predictions_stores_that_are_not_trusted_are_refused(case, lds_inputs, subsets_csv, tmp_path):
    """A store of an older layout, or one that lacks what score and baseline always record."""
    predictions = lds_inputs[0]
    group = zarr.open_group(predictions, mode="r+")
    if case == "one array":
        preds = group["preds/trak"][...]
        write_array(predictions, preds, {**group.attrs, "lambdas": [0.1, 1.0, 10.0]})
        message = (f"{predictions} holds one array, not a group of predictions per method: it was written "
                   "by an older version of diffattr's score; recompute it")
    elif case == "no provenance":
        group.attrs.update({"query_sha256": None})
        message = (f"{predictions} records no query_sha256: it was not written by diffattr's score or "
                   "baseline (or by an older version); recompute it")
    elif case == "no function":
        group.attrs.update({"function": None, "proj_dim": None})
        message = (f"{predictions} (preds/trak) records no function, proj_dim: it was not written by "
                   "diffattr's score or baseline (or by an older version); recompute it")
    elif case == "unknown method":
        group.attrs.update({"methods": ["trak", "tracin"]})
        message = (f"{predictions} holds predictions of method 'tracin', which diffattr does not know "
                   f"(known: {', '.join(METHODS)})")
        assert list(METHODS)[:7] == ["trak", "gradient_dot", "gradient_cos", "relative_if", "renormalized_if",
                                     "pixel_dot", "pixel_cos"]
    elif case == "missing member":
        group.attrs.update({"methods": ["trak", "gradient_dot"]})
        message = f"{predictions} lists method 'gradient_dot' but holds no preds/gradient_dot; recompute it"
    else:
        group["preds/trak"].attrs.update({"lambdas": None})
        message = (f"{predictions} (preds/trak) records no lambdas: it was not written by diffattr's score "
                   "or baseline (or by an older version); recompute it")
    with pytest.raises(ProvenanceError) as error:
        run_lds(lds_inputs, subsets_csv, tmp_path)
    assert str(error.value) == message
    assert not (tmp_path / "lds.csv").exists()


def test_every_method_of_a_store_gets_its_rows(subsets_csv, tmp_path):
    """score_split -> lds_table: one row per (method, rule), each the LDS of that method's predictions."""
    train, query = stores(tmp_path, {"function": "simple"}, {**FEATURE_ATTRS, "function": "simple"})
    out = tmp_path / "scores.zarr"
    methods = ["gradient_cos", "trak", "relative_if"]
    score_split(train, query, subsets_csv, {**SCORE_SPEC, "methods": methods}, out)
    predictions, _ = read_predictions(out)
    assert list(predictions) == methods
    truth = predictions["trak"][0][1] + np.random.default_rng(4).normal(size=(3, 4))
    paths = {}
    for name in MODELS:
        paths[name] = tmp_path / "gt" / f"{name}.zarr"
        write_truth(paths[name], truth[:, int(name[1:4])], name * 8, FEATURE_ATTRS["query_sha256"])
    spec = {**LDS_SPEC, "lambda_rules": ["oracle", "heldout"]}
    lds_table(out, subsets_csv, paths, "val", spec, tmp_path / "lds.csv")
    rows = pd.read_csv(tmp_path / "lds.csv")
    assert list(zip(rows.method, rows.lambda_rule)) == [
        (method, rule) for method in ("Gradient (cos)", "TRAK", "Relative IF") for rule in ("oracle", "heldout")]
    assert (rows.function == "simple").all() and (rows.proj_dim == 4).all()
    for row in rows.itertuples():
        method = methods[row.Index // 2]
        preds, lambdas = predictions[method]
        want = select_lambda(preds, truth, lambdas, row.lambda_rule, 0, 0.9, 50)
        assert row.lds == pytest.approx(want["lds"], rel=1e-12)
        chosen = rows["lambda"][row.Index]
        assert np.isnan(chosen) if method == "gradient_cos" else chosen == want["lambda_"]


def test_lds_rows_of_journey_trak_and_das_carry_their_labels(lds_inputs, subsets_csv, tmp_path):
    """The lds job reads whatever methods a store lists: the new ones get their table labels."""
    predictions, paths, truth = lds_inputs
    preds, lambdas = read_predictions(predictions)[0]["trak"]
    write_predictions(predictions, {"trak": (preds, list(lambdas)), "journey_trak": (preds[::-1], list(lambdas)),
                                    "das": (-preds, list(lambdas))},
                      {**dict(zarr.open_group(predictions, mode="r").attrs), "function": "simple"})
    table = run_lds(lds_inputs, subsets_csv, tmp_path)
    assert list(table.method) == ["TRAK", "Journey-TRAK", "DAS"]
    assert table["lambda"].tolist() == [0.1, 10.0, 10.0]  # each method chooses its own lambda


def test_norm_split_features_share_their_split_and_refuse_the_even_one(saved_model, tiny_spec, subsets_csv,
                                                                       tmp_path):
    """featurize.factor_split norm: the train and val jobs measure the same split on the train images
    (calibration), so their features are scored together; features of the even split are refused."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 3)):
        write_array(tmp_path / f"{split}.zarr", rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32), {})
    spec = {"batch_size": 4, "proj_seed": 0, "scheme": "uniform", "noise_seed": 0, "projector": "factorized"}
    made = {}
    for name, split, factor_split in (("train", "train", "norm"), ("norm", "val", "norm"), ("even", "val", "even")):
        made[name] = tmp_path / factor_split / f"{split}.zarr"
        featurize_split(saved_model, tiny_spec, tmp_path / f"{split}.zarr", "square", select_timesteps(2, "uniform"),
                        96, {**spec, "factor_split": factor_split}, made[name], calibration=tmp_path / "train.zarr")
    attrs = {name: dict(zarr.open_array(path, mode="r").attrs) for name, path in made.items()}
    assert attrs["train"]["factor_sides"] == attrs["norm"]["factor_sides"] != attrs["even"]["factor_sides"]
    assert len(set(attrs["norm"]["factor_sides"])) > 1 and len(set(attrs["even"]["factor_sides"])) == 1
    score_split(made["train"], made["norm"], subsets_csv, {**SCORE_SPEC, "methods": ["trak"]},
                tmp_path / "scores" / "norm.zarr", "val")
    with pytest.raises(ProvenanceError, match="factor_split: 'norm' vs 'even'"):
        score_split(made["train"], made["even"], subsets_csv, SCORE_SPEC, tmp_path / "scores" / "even.zarr")
    with pytest.raises(ValueError, match="factor_split norm: the train split's store"):
        featurize_split(saved_model, tiny_spec, tmp_path / "val.zarr", "square", [0], 96,
                        {**spec, "factor_split": "norm"}, tmp_path / "none.zarr")
