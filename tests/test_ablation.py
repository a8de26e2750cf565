"""Ablations: feature-set names and their tags, noises per timestep and cumulative timesteps against
slow loops, the ground truth of another function, the LDS at every lambda, and the ablation tables."""
import copy
import itertools
import re

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr

from diffattr import noise
from diffattr.ablation import collect
from diffattr.plan import ablation_points, feature_sets
from diffattr.protocol import FEATURE_SET, FEATURE_SET_ANY, FeatureSet, select_timesteps
from diffattr.settings import ConfigError, resolve_all
from diffattr.featurize import batch_gradients, featurize_split
from diffattr.ground_truth import compute_and_save, query_losses
from diffattr.lds import lds, lds_table
from diffattr.methods import write_predictions
from diffattr.storage import array_sha256, file_sha256, read_array, write_array
from diffattr.subsets import make_subsets

from dry_run import REPO
# double_model and images are test_featurize's fixtures, used here too
from test_featurize import assert_grad_close, double_model, images, reference_gradient, reference_value  # noqa: F401
from test_provenance import write_truth

TIMESTEPS, SEED = [0, 400, 999], 7


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("fset, name", [
    (FeatureSet("square", 10, 512), "square_K10_k512"),
    (FeatureSet("simple", 100, 4096, "cumulative"), "simple_K100_k4096_cumulative"),
    (FeatureSet("interp0.25", 10, 64, noises=4), "interp0.25_K10_k64_e4"),
    (FeatureSet("l2", 1000, 32768, "cumulative", 2), "l2_K1000_k32768_cumulative_e2"),
    (FeatureSet("square", 10, 512, "cumulative", 2, 150), "square_K10_k512_cumulative_e2_step150"),
    (FeatureSet("simple", 10, 512, step=0), "simple_K10_k512_step0"),
])
def test_feature_set_names_round_trip(fset, name):
    assert fset.name == name and FeatureSet.parse(name) == fset
    assert re.fullmatch(FEATURE_SET_ANY, name)
    assert fset.tags == name[len(f"{fset.function}_K{fset.n_timesteps}_k{fset.proj_dim}") + 1:]
    assert bool(re.fullmatch(FEATURE_SET, name)) == (fset.step is None)  # the final weights' sets


@pytest.mark.parametrize("name", ["square_K10_k512_e1", "square_K10_k512_uniform", "square_K10_k512_e2_cumulative",
                                  "square_K10", "cube_K10_k512", "square_K0_k512", "square_K10_k512_e0",
                                  "square_K010_k512", "square_K10_k512_step100_e2",
                                  "square_K10_k512_step100_cumulative", "square_K10_k512_step",
                                  "square_K10_k512_step1_x", "Square_K10_k512", "square_k512_K10"])
def test_names_that_are_not_canonical_are_refused(name):
    """One feature set, one name: a default tag written out, tags out of order, bad values."""
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        FeatureSet.parse(name)


def test_grids_sweep_scheme_and_noises_and_ablations_add_their_sets():
    featurize = {"functions": ["square"], "timesteps": [10], "proj_dims": [64], "scheme": ["uniform", "cumulative"],
                 "extra_grids": [{"functions": ["simple"], "timesteps": [10], "proj_dims": [64], "noises": [1, 2]}]}
    ablations = [{"name": "eta", "sweep": {"function": ["interp0", "square"]}, "at": {"K": 10, "k": 64}}]
    assert [s.name for s in feature_sets(featurize, ablations)] == [
        "square_K10_k64", "square_K10_k64_cumulative",
        # an extra grid takes the block's schemes, in the order scheme, then noises
        "simple_K10_k64", "simple_K10_k64_e2", "simple_K10_k64_cumulative", "simple_K10_k64_cumulative_e2",
        "interp0_K10_k64"]  # square_K10_k64 of the ablation is the grid's


def test_ablation_points_are_the_product_of_the_sweep_completed_by_at_and_defaults():
    points = ablation_points({"name": "a", "sweep": {"gt_function": ["simple", "square"], "noises": [1, 2],
                                                     "lambda": "grid"},
                              "at": {"function": "avg", "K": 4, "k": 8, "scheme": "cumulative"}})
    assert [(dict(p.values), p.features.name, p.gt_function) for p in points] == [
        ({"gt_function": gt, "noises": n}, f"avg_K4_k8_cumulative{'_e2' if n == 2 else ''}", gt)
        for gt, n in itertools.product(["simple", "square"], [1, 2])]


def tiny_with(ablations):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["experiments"]["tiny"]["ablations"] = ablations
    return config


@pytest.mark.parametrize("ablation, message", [
    ({"name": "a", "sweep": {"function": ["square"]}, "at": {"K": 4}},
     "experiments.tiny.ablations[0].at.k: got no value; expected it fixed here or swept in ablations[0].sweep"),
    ({"name": "a", "sweep": {"K": [4]}, "at": {"K": 4, "k": 8, "function": "square"}},
     "experiments.tiny.ablations[0].at.K: got 4; expected it in sweep or in at, not both"),
    ({"name": "a", "sweep": {"function": ["square", "cube"]}, "at": {"K": 4, "k": 8}},
     "experiments.tiny.ablations[0].sweep.function[1]: got \"cube\"; expected one of simple, elbo, square"),
    ({"name": "a", "sweep": {"lambda": [3.0]}, "at": {"function": "square", "K": 4, "k": 8}},
     "experiments.tiny.ablations[0].sweep.lambda: got 3.0; expected values of the lambda grid"),
    ({"name": "a", "sweep": {"lambda": "grid"}, "at": {"function": "square", "K": 4, "k": 8},
      "methods": ["gradient_dot"]},
     "experiments.tiny.ablations[0].methods: got \"gradient_dot\"; expected methods with a lambda"),
    ({"name": "a", "sweep": {"K": [4, 2000]}, "at": {"function": "square", "k": 8}},
     "experiments.tiny.ablations[0].sweep.K[1]: got K = 2000; expected K at most T = 1000"),
    ({"name": "a", "sweep": {"noises": [0]}, "at": {"function": "square", "K": 4, "k": 8}},
     "experiments.tiny.ablations[0].sweep.noises[0]: got 0; expected an integer >= 1"),
])
def test_bad_ablations_are_refused_naming_the_key(ablation, message):
    with pytest.raises(ConfigError) as error:
        resolve_all(tiny_with([ablation]))
    assert message in str(error.value)


def test_two_ablations_of_one_name_are_refused():
    ablation = {"name": "a", "sweep": {"K": [4]}, "at": {"function": "square", "k": 8}}
    with pytest.raises(ConfigError, match=r"ablations\[1\]\.name: got \"a\"; expected a name no other"):
        resolve_all(tiny_with([ablation, copy.deepcopy(ablation)]))


# ---------------------------------------------------------------- features

def reference_noises_gradient(model, image, index, function, timesteps, seed, noises):
    """(1/(K N)) sum_t sum_d grad f(x, t, eps_d), one forward and backward per (t, draw), eps_d drawn
    from numpy's generator seeded with [seed, index, t] (d = 0) or [seed, index, t, d]."""
    unet, params = model.unet, [p for p in model.unet.parameters() if p.requires_grad]
    abar, betas = model.scheduler.alphas_cumprod.double(), model.scheduler.betas.double()
    x0 = torch.from_numpy(image)[None]
    total = [torch.zeros_like(p) for p in params]
    for t, d in itertools.product(timesteps, range(noises)):
        key = [seed, index, t] + ([d] if d else [])
        eps = torch.from_numpy(np.random.default_rng(key).standard_normal(image.shape, dtype=np.float32)).double()[None]
        x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
        grads = torch.autograd.grad(reference_value(function, unet(x_t, torch.tensor([t])).sample, eps, t, betas,
                                                    abar), params)
        total = [a + g for a, g in zip(total, grads)]
    return torch.cat([g.reshape(-1) for g in total]) / (len(timesteps) * noises)


@pytest.mark.parametrize("function, max_pass_items", [("simple", None), ("square", None), ("elbo", None),
                                                     ("interp0.3", None), ("square", 4)])
def test_noises_per_timestep_match_a_loop_over_samples_timesteps_and_draws(double_model, images, function,
                                                                          max_pass_items):
    """Also in passes of at most `max_pass_items` noised copies: 2 samples -> chunks of 2 (t, draw) pairs."""
    got = batch_gradients(double_model, torch.from_numpy(images), [3, 8], function, TIMESTEPS, SEED, noises=3,
                          max_pass_items=max_pass_items)
    for row, index in enumerate([3, 8]):
        assert_grad_close(got[row], reference_noises_gradient(double_model, images[row], index, function,
                                                              TIMESTEPS, SEED, 3))
    one = batch_gradients(double_model, torch.from_numpy(images), [3, 8], function, TIMESTEPS, SEED)
    assert not torch.allclose(got, one, rtol=1e-3, atol=0)  # the other draws really count


def legacy_batch_gradients(model, images, indices, function, timesteps, noise_seed):
    """batch_gradients as it was before noises per timestep, word for word."""
    from diffattr.functions import model_output

    params = {name: p.detach() for name, p in model.featurized_parameters()}
    x0 = model.encode(images)
    t = torch.tensor(list(timesteps), device=x0.device)
    eps = noise.noise_batch([(noise_seed, int(i), int(s)) for i in indices for s in timesteps], x0.shape[1:])
    eps = eps.reshape(len(x0), len(t), *x0.shape[1:]).to(x0.device, x0.dtype)

    def value(params, x0, eps):
        x_t = model.scheduler.add_noise(x0.expand(len(t), *x0.shape), eps, t)
        return model_output(function, model.predict_with(params, x_t, t, None), eps, t, model.scheduler).mean()

    grads = torch.func.vmap(torch.func.grad(value), in_dims=(None, 0, 0))(params, x0, eps)
    return torch.cat([grads[name].reshape(len(x0), -1) for name in params], dim=1).float()


@pytest.mark.parametrize("function", ["simple", "l2"])
def test_one_noise_per_timestep_is_todays_features_bitwise(make_tiny_model, tiny_images, function):
    model = make_tiny_model(2).for_per_sample_gradients()
    x = torch.from_numpy(tiny_images[:3])
    # the vmap engine is the code the legacy function was; the hooks engine agrees within rounding
    new = batch_gradients(model, x, [0, 1, 2], function, TIMESTEPS, SEED, noises=1, engine="vmap")
    assert torch.equal(new, legacy_batch_gradients(model, x, [0, 1, 2], function, TIMESTEPS, SEED))
    key = np.random.default_rng([SEED, 4, 400]).standard_normal((1, 8, 8), dtype=np.float32)
    assert np.array_equal(noise.gaussian(SEED, 4, 400, (1, 8, 8), draw=0), key)  # draw 0: today's noise
    assert not np.allclose(noise.gaussian(SEED, 4, 400, (1, 8, 8), draw=1), key)


def test_featurize_split_with_noises_and_cumulative_timesteps(make_tiny_model, tiny_spec, tiny_images, tmp_path):
    """A `_cumulative_e2` feature set: timesteps range(K), two draws each, recorded in the store, and
    its rows those of the loop reference projected; without `noises` in the spec, today's store."""
    model = make_tiny_model(2)
    model.save(tmp_path / "model")
    weights = tmp_path / "model" / "diffusion_pytorch_model.safetensors"
    write_array(tmp_path / "val.zarr", tiny_images[:3], {})
    fset = FeatureSet.parse("square_K3_k8_cumulative_e2")
    timesteps = select_timesteps(fset.n_timesteps, fset.scheme)
    assert timesteps == [0, 1, 2]
    spec = {"batch_size": 2, "proj_seed": 0, "noise_seed": SEED, "scheme": fset.scheme, "noises": fset.noises}
    featurize_split(weights, tiny_spec, tmp_path / "val.zarr", fset.function, timesteps, fset.proj_dim, spec,
                    tmp_path / "e2.zarr")
    rows, attrs = read_array(tmp_path / "e2.zarr")
    assert (attrs["scheme"], attrs["noises"], attrs["timesteps"], attrs["K"]) == ("cumulative", 2, [0, 1, 2], 3)
    from diffattr.featurize import gradient_dim
    from diffattr.project import make_projector
    from test_featurize import dense_projection

    double = make_tiny_model(2, torch.float64)
    projector, _ = make_projector(gradient_dim(model), 8, 0, torch.device("cpu"), 2)
    P = dense_projection(projector, gradient_dim(model))
    ref = np.stack([(reference_noises_gradient(double, tiny_images[i].astype(np.float64), i, "square", timesteps,
                                               SEED, 2) @ P).numpy() for i in range(3)])
    np.testing.assert_allclose(rows, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    plain = {"batch_size": 2, "proj_seed": 0, "noise_seed": SEED, "scheme": "uniform"}
    featurize_split(weights, tiny_spec, tmp_path / "val.zarr", "square", [0, 500], 8, plain, tmp_path / "a.zarr")
    featurize_split(weights, tiny_spec, tmp_path / "val.zarr", "square", [0, 500], 8, {**plain, "noises": 1},
                    tmp_path / "b.zarr")
    assert np.array_equal(read_array(tmp_path / "a.zarr")[0], read_array(tmp_path / "b.zarr")[0])
    one = np.stack([(reference_gradient(double, tiny_images[i].astype(np.float64), i, "square", [0, 500], SEED)
                     @ P).numpy() for i in range(3)])
    np.testing.assert_allclose(read_array(tmp_path / "a.zarr")[0], one, rtol=1e-4, atol=1e-4 * np.abs(one).max())


# ---------------------------------------------------------------- ground truth of another function

def legacy_loss_simple(model, images, timesteps, noise_seeds, batch_size):
    """ground_truth's L_Simple as it was before the function became a choice, word for word."""
    triples = list(itertools.product(noise_seeds, range(len(images)), timesteps))
    totals = np.zeros(len(images), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(triples), batch_size):
            chunk = triples[start:start + batch_size]
            index = np.array([i for _, i, _ in chunk])
            t = torch.tensor([t for _, _, t in chunk])
            x0 = model.encode(torch.from_numpy(images[index]))
            eps = noise.noise_batch(chunk, x0.shape[1:])
            pred = model.predict(model.scheduler.add_noise(x0, eps, t), t, model.conditioning(None)).float()
            np.add.at(totals, index, (pred - eps).pow(2).flatten(1).mean(1).double().cpu().numpy())
    return totals / (len(timesteps) * len(noise_seeds))


def test_default_ground_truth_is_todays_bitwise(make_tiny_model, tiny_images):
    model = make_tiny_model(3)
    got = query_losses(model, tiny_images, TIMESTEPS, [0, 1], 4)
    assert np.array_equal(got, legacy_loss_simple(model, tiny_images, TIMESTEPS, [0, 1], 4))


@pytest.mark.parametrize("function", ["square", "l1", "elbo"])
def test_ground_truth_of_another_function_matches_a_loop(make_tiny_model, tiny_images, function):
    model, double = make_tiny_model(3), make_tiny_model(3, torch.float64)
    got = query_losses(model, tiny_images[:3], TIMESTEPS, [0, 2], 5, function=function)
    abar, betas = double.scheduler.alphas_cumprod.double(), double.scheduler.betas.double()
    want = np.zeros(3)
    with torch.no_grad():
        for q, t, seed in itertools.product(range(3), TIMESTEPS, [0, 2]):
            eps = torch.from_numpy(noise.gaussian(seed, q, t, (1, 8, 8))).double()[None]
            x_t = abar[t].sqrt() * torch.from_numpy(tiny_images[q]).double()[None] + (1 - abar[t]).sqrt() * eps
            pred = double.unet(x_t, torch.tensor([t])).sample
            want[q] += reference_value(function, pred, eps, t, betas, abar).item() / 6
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.allclose(got, query_losses(model, tiny_images[:3], TIMESTEPS, [0, 2], 5), rtol=1e-2)


def test_ground_truth_store_records_its_function(make_tiny_model, tiny_spec, tiny_images, tmp_path):
    make_tiny_model(3).save(tmp_path / "m")
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    write_array(tmp_path / "val.zarr", tiny_images[:3], {})
    write_array(tmp_path / "gen.zarr", tiny_images[3:], {})
    paths = {"val": tmp_path / "val.zarr", "gen": tmp_path / "gen.zarr"}
    spec = {"timesteps": 4, "noise_seeds": [0], "batch_size": 8}
    compute_and_save(weights, tiny_spec, paths, spec, tmp_path / "simple.zarr")
    compute_and_save(weights, tiny_spec, paths, {**spec, "function": "square"}, tmp_path / "square.zarr")
    simple, square = zarr.open_group(tmp_path / "simple.zarr"), zarr.open_group(tmp_path / "square.zarr")
    assert simple.attrs["function"] == "simple" and square.attrs["function"] == "square"
    model = make_tiny_model(3)
    np.testing.assert_array_equal(square["val"][...], query_losses(model, tiny_images[:3], select_timesteps(4, "uniform"),
                                                                   [0], 8, function="square"))
    np.testing.assert_array_equal(simple["val"][...], legacy_loss_simple(model, tiny_images[:3],
                                                                         select_timesteps(4, "uniform"), [0], 8))


# ---------------------------------------------------------------- LDS at every lambda, ablation tables

MODELS = [f"s{j:03d}-r{r}" for j in range(6) for r in (0, 1)]
LDS_SPEC = {"lambda_rules": ["oracle", "heldout"], "confidence": 0.9, "bootstrap_resamples": 30,
            "heldout_seed": 0}


def lds_store(tmp_path, function, seed):
    """A predictions store of trak (3 lambdas) and gradient_dot, and its ground truth stores."""
    rng = np.random.default_rng(seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    subsets = tmp_path / "subsets.csv"
    make_subsets(np.arange(12) % 2, 6, 0.5, 42).to_csv(subsets, index=False)
    truth = rng.normal(size=(4, 6))
    trak = truth[None] + rng.normal(scale=[[[0.3]], [[1.0]], [[3.0]]], size=(3, 4, 6))
    dot = truth[None] + rng.normal(size=(1, 4, 6))
    store = tmp_path / f"{function}.zarr"
    write_predictions(store, {"trak": (trak, [0.1, 1.0, 10.0]), "gradient_dot": (dot, [None])},
                      {"query_sha256": "q" * 64, "subsets_sha256": file_sha256(subsets), "function": function,
                       "K": 4, "proj_dim": 8, "scheme": "cumulative", "noises": 2})
    paths = {}
    for name in MODELS:
        paths[name] = tmp_path / f"gt-{function}" / f"{name}.zarr"
        losses = truth[:, int(name[1:4])] + (0.5 if name[-1] == "1" else -0.5)
        write_truth(paths[name], losses, f"{name}{function}".ljust(64, "x"), "q" * 64)
        gen = zarr.open_group(paths[name], mode="r+").create_array("gen", shape=losses.shape, dtype=losses.dtype)
        gen[...] = losses  # the same truth for the generated queries
        gen.attrs["query_sha256"] = "q" * 64
    return store, subsets, paths, trak, dot, truth


def test_lds_at_every_lambda_is_the_lds_of_that_lambdas_predictions(tmp_path):
    store, subsets, paths, trak, dot, truth = lds_store(tmp_path, "square", 0)
    lds_table(store, subsets, paths, "gen", LDS_SPEC, tmp_path / "lds.csv", tmp_path / "curve.csv")
    curve = pd.read_csv(tmp_path / "curve.csv", keep_default_na=False, na_values=[""])
    assert list(zip(curve.method, curve["lambda"].fillna(-1))) == [("D-TRAK", 0.1), ("D-TRAK", 1.0),
                                                                    ("D-TRAK", 10.0), ("Gradient (dot)", -1)]
    direct = [lds(trak[0], truth), lds(trak[1], truth), lds(trak[2], truth), lds(dot[0], truth)]
    np.testing.assert_allclose(curve.lds, direct, rtol=1e-12)
    assert len(set(np.round(direct[:3], 9))) == 3  # the lambdas really differ: the curve is not flat
    assert set(curve.tags) == {"cumulative_e2"} and set(curve.split) == {"gen"}
    table = pd.read_csv(tmp_path / "lds.csv")
    oracle = table[(table.method == "D-TRAK") & (table.lambda_rule == "oracle")].iloc[0]
    assert oracle["lambda"] == 0.1 and oracle.lds == pytest.approx(direct[0], rel=1e-12)
    assert set(table.tags) == {"cumulative_e2"}


def test_ablation_tables_hold_each_points_lds(tmp_path):
    entries = []
    for i, function in enumerate(["simple", "square"]):
        store, subsets, paths, *_ = lds_store(tmp_path / function, function, i)
        for split in ("val", "gen"):
            out = tmp_path / function / f"{split}.csv"
            lds_table(store, subsets, paths, split, LDS_SPEC, out, out.with_suffix(".lambdas.csv"))
            entries.append(({"function": function}, split, out))
    spec = {"name": "f", "sweep": {"function": ["simple", "square"]}, "at": {"K": 4, "k": 8},
            "methods": ["trak", "gradient_dot"]}
    table = collect(spec, entries, tmp_path / "f.csv", tmp_path / "f.md", "demo")
    assert len(table) == 2 * 2 * (2 + 2)  # functions x splits x (trak's two rules + gradient_dot's)
    for (values, split, path) in entries:
        source = pd.read_csv(path)
        for method, name in (("trak", "TRAK" if values["function"] == "simple" else "D-TRAK"),
                             ("gradient_dot", "Gradient (dot)")):
            got = table[(table.function == values["function"]) & (table.split == split) & (table.method == method)]
            want = source[source.method == name]
            assert list(got.lambda_rule) == list(want.lambda_rule) and list(got.label) == [name] * len(want)
            np.testing.assert_allclose(got.lds, want.lds, rtol=1e-12)
    report = (tmp_path / "f.md").read_text()
    val_oracle = table[(table.method == "trak") & (table.function == "square") & (table.split == "val")
                       & (table.lambda_rule == "oracle")].iloc[0]
    assert f"| square | {100 * val_oracle.lds:.2f} [" in report and "## TRAK (`trak`)" in report
    assert "## Gradient (dot) (`gradient_dot`)" in report
    assert pd.read_csv(tmp_path / "f.csv").shape == table.shape

    lambdas = [(values, split, path.with_suffix(".lambdas.csv")) for values, split, path in entries]
    spec = {"name": "l", "sweep": {"function": ["simple", "square"], "lambda": [0.1, 10.0]}, "at": {"K": 4, "k": 8}}
    table = collect(spec, lambdas, tmp_path / "l.csv", tmp_path / "l.md", "demo")
    assert list(table["lambda"]) == [0.1, 10.0] * 4 and set(table.method) == {"trak"}
    for (values, split, path) in lambdas:
        curve = pd.read_csv(path)
        got = table[(table.function == values["function"]) & (table.split == split)]
        np.testing.assert_allclose(got.lds, curve.lds[curve["lambda"].isin([0.1, 10.0])], rtol=1e-12)
    assert "| simple | 0.1 |" in (tmp_path / "l.md").read_text()


def test_a_method_missing_from_the_tables_is_named(tmp_path):
    store, subsets, paths, *_ = lds_store(tmp_path, "square", 0)
    lds_table(store, subsets, paths, "val", LDS_SPEC, tmp_path / "val.csv")
    spec = {"name": "x", "sweep": {"K": [4]}, "at": {"function": "square", "k": 8}, "methods": ["relative_if"]}
    with pytest.raises(ValueError, match="no rows of method 'relative_if'.*add it to score.methods"):
        collect(spec, [({"K": 4}, "val", tmp_path / "val.csv")], tmp_path / "x.csv", tmp_path / "x.md", "demo")
    assert not (tmp_path / "x.csv").exists()
