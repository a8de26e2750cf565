"""A test-only model kind run through every stage: class-conditional (a label embedding), v-prediction,
and diffusing in a scaled space (x0 = SCALE * image, as a VAE's latents are scaled). Each stage's
library function is compared with a slow reference written here from the kind's UNet and the formulas
(velocity, DDIM step), so a stage that forgets to encode or decode, to condition on each row's label
or to compare with the v target fails; each test also checks that such a slip would be seen.
"""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

from diffattr import noise
from diffattr.protocol import select_timesteps
from diffattr.settings import ConfigError, resolve_all, validate_experiment
from diffattr.das import compute_residuals, residual_weights
from diffattr.data import build_splits, load_images, load_labels
from diffattr.featurize import batch_gradients, featurize_split, gradient_dim
from diffattr.generate import ddim_scheduler, generate_set, sample
from diffattr.ground_truth import compute_and_save
from diffattr.journey import featurize_journey
from diffattr.models import KINDS, PixelDDPM, build_model, load_model
from diffattr.project import make_projector
from diffattr.storage import read_array, read_attrs, read_member, write_array
from diffattr.train import train, train_and_save

from conftest import TINY_SPEC, abar, assert_close, assert_far, velocity

NUM_CLASSES, SCALE, SEED = 3, 0.5, 4
SPEC = {"kind": "labelled_v", "unet": {**TINY_SPEC["unet"], "num_class_embeds": NUM_CLASSES},
        "scheduler": {"prediction_type": "v_prediction"}}
GEN = {"n": 3, "steps": 4, "eta": 0.0, "seed": 5, "batch_size": 2, "dtype": "fp32"}
FEATURIZE = {"batch_size": 2, "proj_seed": 42, "scheme": "uniform", "noise_seed": 7}
TRAIN = {"steps": 2, "batch_size": 4, "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0,
         "grad_clip": 1.0, "warmup_fraction": 0.0, "model": SPEC}
PROJ_DIM, SHAPE = 16, (1, 8, 8)


class LabelledV(PixelDDPM):
    """The tiny UNet with a class embedding, v-prediction (from the spec's scheduler), diffusing
    SCALE * image; the class embedding is trained but not featurized (as SD would featurize only LoRA)."""

    @property
    def num_classes(self):
        return self.unet.config.num_class_embeds

    def encode(self, images):
        return images * SCALE

    def decode(self, x0):
        return x0 / SCALE

    def conditioning(self, labels):
        if labels is None:
            raise ValueError("labelled_v: every image needs its class label")
        return labels.long()

    def predict(self, x_t, t, cond=None):
        return self.unet(x_t, t.to(x_t.device), class_labels=cond).sample

    def predict_with(self, params, x_t, t, cond=None):
        return torch.func.functional_call(self.unet, params, (x_t, t.to(x_t.device)),
                                          {"class_labels": cond}).sample

    def featurized_parameters(self):
        return [(name, p) for name, p in super().featurized_parameters()
                if not name.startswith("class_embedding.")]


@pytest.fixture(scope="module")
def registered():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(KINDS, "labelled_v", LabelledV)
        yield


@pytest.fixture(scope="module")
def run(registered, tmp_path_factory):
    """A saved model of the kind, a labelled train store and the model's generation set."""
    root = tmp_path_factory.mktemp("kind")
    build_model(SPEC, SEED).save(root / "model")
    weights = root / "model" / LabelledV.weights_file
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (6, *SHAPE)).astype(np.float32)
    write_array(root / "train.zarr", train, {"labels": [0, 2, 1, 1, 0, 2]})
    generate_set(weights, SPEC, GEN, root / "gen.zarr")
    return {"root": root, "weights": weights, "model": load_model(SPEC, root / "model").train(False)}


def double(run):
    """The saved model again, in float64: the references' network."""
    model = load_model(SPEC, run["root"] / "model").train(False)
    model.unet.to(torch.float64)
    return model


def prediction(model, x_t, t, label):
    """The UNet's output for one sample (C, H, W) of class `label` at timestep t."""
    return model.unet(x_t[None], torch.tensor([t]), class_labels=torch.tensor([int(label)])).sample[0]


def hand_loss(model, image, label, index, t, seed, target="v"):
    """L_Simple of one (image, t, noise) by hand: ||v_theta - v||^2 / d (or against eps, for the checks)."""
    x0 = SCALE * torch.from_numpy(image).double()
    eps = torch.from_numpy(noise.gaussian(seed, index, t, image.shape)).double()
    a = abar(model, t)
    pred = prediction(model, a.sqrt() * x0 + (1 - a).sqrt() * eps, t, label)
    return ((pred - (velocity(model, x0, eps, t) if target == "v" else eps)) ** 2).mean()


@torch.no_grad()
def hand_ddim(model, index: int, label: int, steps: int, seed: int):
    """Image `index` of the generation set by a DDIM loop (eta 0) written from its update rule for
    v-prediction, and its trajectory inputs x_s; float64."""
    ddim = ddim_scheduler(model, steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + index)).double()
    states = []
    for t in ddim.timesteps.tolist():
        states.append(x)
        a, prev = abar(model, t), t - ddim.config.num_train_timesteps // steps
        a_prev = abar(model, prev) if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        v = prediction(model, x, t, label)
        x0, eps = a.sqrt() * x - (1 - a).sqrt() * v, a.sqrt() * v + (1 - a).sqrt() * x
        if ddim.config.clip_sample:
            x0 = x0.clamp(-ddim.config.clip_sample_range, ddim.config.clip_sample_range)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return (x / SCALE).clamp(-1, 1), torch.stack(states)


def test_target_is_the_velocity_and_epsilon_models_keep_eps(registered, make_tiny_model):
    model = build_model(SPEC, SEED)
    x0, eps, t = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE), torch.tensor([0, 400, 999])
    ref = torch.stack([velocity(model, x0[i].double(), eps[i].double(), int(t[i])) for i in range(3)])
    assert_close(model.target(x0, eps, t), ref, 1e-6)
    assert make_tiny_model(0).target(x0, eps, t) is eps  # the pixel DDPM's arithmetic is untouched


def test_saved_model_holds_its_kinds_artifact_files(run, tiny_model, tmp_path):
    assert sorted(p.name for p in (run["root"] / "model").iterdir()) == sorted(LabelledV.artifact_files)
    tiny_model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PixelDDPM.artifact_files)
    assert PixelDDPM.weights_file in PixelDDPM.artifact_files


def test_splits_store_their_labels_beside_unchanged_images(tmp_path):
    out = {f"{split}_{what}": tmp_path / f"{split}.{'zarr' if what == 'images' else 'csv'}"
           for split in ("train", "val") for what in ("images", "index")}
    build_splits({"source": "sklearn_digits", "n_train": 30, "n_val": 12, "split_seed": 0}, out)
    for split in ("train", "val"):
        table = pd.read_csv(out[f"{split}_index"])
        np.testing.assert_array_equal(load_labels(out[f"{split}_images"]), table["label"].to_numpy())
        assert read_array(out[f"{split}_images"])[0].dtype == np.float32
    write_array(tmp_path / "old.zarr", np.zeros((2, *SHAPE), np.float32), {})
    assert load_labels(tmp_path / "old.zarr") is None  # a store without labels: an unconditional model's


def test_training_loss_is_the_v_loss_of_each_images_label(run, tmp_path):
    """Step 0's logged loss against its draws replayed by hand (train's order: permutation, t, noise)."""
    weights = tmp_path / "model" / LabelledV.weights_file
    train_and_save(run["root"] / "train.zarr", None, None, SEED, TRAIN, weights)
    logged = pd.read_csv(weights.parent / "train_log.csv")["loss"][0]
    images, labels = load_images(run["root"] / "train.zarr"), load_labels(run["root"] / "train.zarr")
    model = build_model(SPEC, SEED).train(False)  # the initial weights (no dropout: eval = train)
    model.unet.to(torch.float64)
    gen = torch.Generator().manual_seed(SEED)
    index = torch.randperm(len(images), generator=gen)[:TRAIN["batch_size"]]
    t = torch.randint(0, 1000, (len(index),), generator=gen)
    eps = torch.randn((len(index), *SHAPE), generator=gen).double()
    x0 = SCALE * torch.from_numpy(images[index.numpy()]).double()

    @torch.no_grad()
    def loss(label_of, target_of):
        values = []
        for j, i in enumerate(index.tolist()):
            a = abar(model, int(t[j]))
            pred = prediction(model, a.sqrt() * x0[j] + (1 - a).sqrt() * eps[j], int(t[j]), label_of(i))
            values.append(((pred - target_of(j)) ** 2).mean().item())
        return np.mean(values)

    def v(j):
        return velocity(model, x0[j], eps[j], int(t[j]))

    assert_close(logged, loss(lambda i: labels[i], v), 1e-5)
    assert_far(logged, loss(lambda i: labels[i], lambda j: eps[j]), 1e-5)
    assert_far(logged, loss(lambda i: (labels[i] + 1) % NUM_CLASSES, v), 1e-5)


def test_bf16_training_follows_fp32_in_fp32_weights(run):
    """Mixed precision on the CPU (bf16 autocast): each step's loss is within bf16's rounding of the fp32
    training's but not equal to it (autocast took effect); the weights are trained and kept in fp32."""
    images = torch.from_numpy(load_images(run["root"] / "train.zarr"))
    labels = torch.from_numpy(load_labels(run["root"] / "train.zarr"))
    spec = {**TRAIN, "steps": 6, "hflip": True}
    losses, weights = {}, {}
    for dtype in ("fp32", "bf16"):
        model = build_model(SPEC, SEED)
        losses[dtype] = train(model, images, labels, {**spec, "dtype": dtype}, SEED)["loss"].to_numpy(copy=True)
        weights[dtype] = list(model.unet.parameters())
    assert_close(losses["bf16"], losses["fp32"], 2e-2)
    assert not np.array_equal(losses["bf16"], losses["fp32"])
    initial = list(build_model(SPEC, SEED).unet.parameters())
    assert all(p.dtype == torch.float32 and not torch.equal(p, q) for p, q in zip(weights["bf16"], initial))


def test_generation_set_matches_a_hand_ddim_loop_of_each_recorded_label(run):
    labels = load_labels(run["root"] / "gen.zarr")
    np.testing.assert_array_equal(labels, np.arange(GEN["n"]) % NUM_CLASSES)
    assert read_attrs(run["root"] / "gen.zarr")["labels_rule"] == "i mod num_classes"
    images, model = load_images(run["root"] / "gen.zarr"), double(run)
    for i, label in enumerate(labels):
        assert_close(images[i], hand_ddim(model, i, label, GEN["steps"], GEN["seed"])[0], 1e-5)
    assert_far(images[0], hand_ddim(model, 0, 1, GEN["steps"], GEN["seed"])[0], 1e-5)


def test_generation_follows_labels_and_batches_of_one_equal_the_batch(run):
    model, args = run["model"], (SHAPE, GEN["steps"], 0.0, GEN["seed"])
    labels = np.array([0, 1, 2])
    batch = sample(model, 3, *args, batch_size=3, labels=labels)
    np.testing.assert_allclose(sample(model, 3, *args, batch_size=1, labels=labels), batch, atol=1e-6)
    other = sample(model, 3, *args, batch_size=3, labels=np.array([2, 1, 2]))
    assert np.abs(other[0] - batch[0]).max() > 1e-3  # another label, another image from the same noise
    np.testing.assert_allclose(other[1:], batch[1:], atol=1e-6)


def test_ground_truth_is_each_querys_v_loss_under_its_label(run, tmp_path):
    spec = {"timesteps": 2, "noise_seeds": [0, 1], "batch_size": 3}
    paths = {"val": run["root"] / "train.zarr", "gen": run["root"] / "gen.zarr"}
    compute_and_save(run["weights"], SPEC, paths, spec, tmp_path / "gt.zarr")
    model, timesteps = double(run), select_timesteps(2, "uniform")
    for split, path in paths.items():
        got = read_member(tmp_path / "gt.zarr", split)[0]
        images, labels = load_images(path), load_labels(path)

        def reference(label_of, target="v"):
            with torch.no_grad():
                return [np.mean([hand_loss(model, images[i], label_of(i), i, t, s, target).item()
                                 for t in timesteps for s in spec["noise_seeds"]]) for i in range(len(images))]

        assert_close(got, reference(lambda i: labels[i]), 1e-5)
        assert_far(got, reference(lambda i: labels[i], "eps"), 1e-5)
        assert_far(got, reference(lambda i: (labels[i] + 1) % NUM_CLASSES), 1e-5)


def reference_row(model, label, pairs, function):
    """(1/K) sum_k grad f over the featurized parameters by ordinary autograd, one pass per (x_t, t,
    target) of `pairs`, f = simple (against the target) or square."""
    params = [p for _, p in model.featurized_parameters()]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for x_t, t, target in pairs:
        pred = prediction(model, x_t, t, label)
        value = ((pred - target) ** 2).mean() if function == "simple" else (pred ** 2).mean()
        total += torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])
    return total / len(pairs)


def noised_pairs(model, image, index, timesteps, seed):
    x0 = SCALE * torch.from_numpy(image).double()
    pairs = []
    for t in timesteps:
        eps = torch.from_numpy(noise.gaussian(seed, index, t, image.shape)).double()
        a = abar(model, t)
        pairs.append((a.sqrt() * x0 + (1 - a).sqrt() * eps, t, velocity(model, x0, eps, t)))
    return pairs


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
@pytest.mark.parametrize("function", ["simple", "square"])
def test_feature_rows_are_autograd_of_f_with_the_v_target_and_the_rows_label(run, engine, function):
    model = double(run).for_per_sample_gradients()
    images = load_images(run["root"] / "train.zarr")[:3].astype(np.float64)
    labels, timesteps = np.array([2, 0, 1]), [0, 300, 999]
    got = batch_gradients(model, torch.from_numpy(images), [4, 5, 6], function, timesteps, 7, labels,
                          engine=engine)
    assert got.shape == (3, gradient_dim(model))
    for b in range(3):
        pairs = noised_pairs(model, images[b], 4 + b, timesteps, 7)
        assert_close(got[b], reference_row(model, labels[b], pairs, function), 1e-5)
        assert_far(got[b], reference_row(model, (labels[b] + 1) % NUM_CLASSES, pairs, function), 1e-5)
        if function == "simple":
            eps_pairs = [(x_t, t, (x_t - abar(model, t).sqrt() * SCALE * torch.from_numpy(images[b]))
                          / (1 - abar(model, t)).sqrt()) for x_t, t, _ in pairs]
            assert_far(got[b], reference_row(model, labels[b], eps_pairs, function), 1e-5)


def projected(run, rows):
    projector, _ = make_projector(gradient_dim(run["model"]), PROJ_DIM, FEATURIZE["proj_seed"],
                                  torch.device("cpu"), FEATURIZE["batch_size"])
    return projector.project(torch.stack(rows).float(), model_id=0).double()


def test_featurized_store_conditions_each_row_on_the_stores_label(run, tmp_path):
    timesteps = select_timesteps(2, "uniform")
    featurize_split(run["weights"], SPEC, run["root"] / "train.zarr", "simple", timesteps, PROJ_DIM, FEATURIZE,
                    tmp_path / "f.zarr")
    got, model = read_array(tmp_path / "f.zarr")[0], double(run)
    images, labels = load_images(run["root"] / "train.zarr"), load_labels(run["root"] / "train.zarr")
    rows = [reference_row(model, labels[i], noised_pairs(model, images[i], i, timesteps,
                                                                FEATURIZE["noise_seed"]), "simple")
            for i in range(len(images))]
    assert_close(got, projected(run, rows), 1e-4)


def test_journey_features_use_the_trajectorys_velocity_and_the_images_label(run, tmp_path):
    featurize_journey(run["weights"], SPEC, run["root"] / "gen.zarr", "simple", GEN, PROJ_DIM, FEATURIZE,
                      tmp_path / "j.zarr")
    got, model = read_array(tmp_path / "j.zarr")[0], double(run)
    images, labels = load_images(run["root"] / "gen.zarr"), load_labels(run["root"] / "gen.zarr")
    timesteps = ddim_scheduler(model, GEN["steps"]).timesteps.tolist()

    def rows(label_of, target="v"):
        out = []
        for i, image in enumerate(images):
            states = hand_ddim(model, i, labels[i], GEN["steps"], GEN["seed"])[1]
            z = SCALE * torch.from_numpy(image).double()  # the stored image, encoded
            pairs = []
            for x_s, t in zip(states, timesteps):
                eps = (x_s - abar(model, t).sqrt() * z) / (1 - abar(model, t)).sqrt()  # the implied noise
                pairs.append((x_s, t, velocity(model, z, eps, t) if target == "v" else eps))
            out.append(reference_row(model, label_of(i), pairs, "simple"))
        return projected(run, out)

    # the implied noise at t = 0 divides the trajectories' float32 round-off by sqrt(1 - abar_0) = 0.01
    assert_close(got, rows(lambda i: labels[i]), 1e-3)
    assert_far(got, rows(lambda i: labels[i], "eps"), 1e-3)
    assert_far(got, rows(lambda i: (labels[i] + 1) % NUM_CLASSES), 1e-3)


def test_das_residuals_are_rms_v_errors_under_each_label(run, tmp_path):
    timesteps, seed = [10, 500, 990], 3
    compute_residuals(run["weights"], SPEC, run["root"] / "train.zarr", timesteps, seed, 4, tmp_path / "r.zarr")
    got, model = read_array(tmp_path / "r.zarr")[0], double(run)
    images, labels = load_images(run["root"] / "train.zarr"), load_labels(run["root"] / "train.zarr")

    def reference(label_of, target="v"):
        with torch.no_grad():
            return residual_weights([[hand_loss(model, images[i], label_of(i), i, t, seed, target).sqrt().item()
                                      for t in timesteps] for i in range(len(images))])

    assert_close(got, reference(lambda i: labels[i]), 1e-5)
    assert_far(got, reference(lambda i: labels[i], "eps"), 1e-5)
    assert_far(got, reference(lambda i: (labels[i] + 1) % NUM_CLASSES), 1e-5)


@pytest.fixture(scope="module")
def preset():
    import yaml
    from pathlib import Path

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    return copy.deepcopy(resolve_all(config)[config["experiment"]])


@pytest.mark.parametrize("change, fault", [
    (lambda m: m.update(kind="latent_sd"), r'model.kind: got "latent_sd"; expected one of "pixel_ddpm"'),
    (lambda m: m.pop("unet"), "model.unet: got no value; expected a mapping"),
    (lambda m: m.update(vae={}), "model.vae: got {}; expected no such key: pixel_ddpm takes kind, unet, scheduler"),
    (lambda m: m.setdefault("scheduler", {}).update(prediction_type="sample"),
     "model.scheduler.prediction_type: got \"sample\"; expected one of \"epsilon\", \"v_prediction\""),
])
def test_the_config_check_gives_each_kind_its_own_blocks(preset, change, fault):
    settings = copy.deepcopy(preset)
    change(settings["model"])
    with pytest.raises(ConfigError) as error:
        validate_experiment(settings, "x")
    assert str(error.value).startswith(f"experiments.x.{fault}")


def test_a_kind_is_configured_by_its_kinds_entry_alone(registered, preset):
    """Registered in KINDS and nowhere else, the test kind is a valid `model.kind`, and the config
    check holds its blocks (its config_blocks, a UNet with class embeddings) to their classes."""
    settings = copy.deepcopy(preset)
    settings["model"].update(kind="labelled_v", scheduler={"prediction_type": "v_prediction"})
    settings["model"]["unet"]["num_class_embeds"] = NUM_CLASSES
    validate_experiment(settings, "x")
    settings["model"]["unet"]["num_class_embed"] = NUM_CLASSES
    with pytest.raises(ConfigError, match=r"^experiments\.x\.model\.unet\.num_class_embed: got 3; expected no "
                                          r"such key \(did you mean num_class_embeds\?\)"):
        validate_experiment(settings, "x")


def test_schema_accepts_v_prediction_for_the_pixel_ddpm(preset):
    settings = copy.deepcopy(preset)
    settings["model"]["scheduler"] = {"prediction_type": "v_prediction"}
    validate_experiment(settings, "x")
