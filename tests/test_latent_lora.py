"""The latent Stable Diffusion + LoRA kind (diffattr.latent) on a tiny stack (8x8 one-channel images,
4x4x4 latents): its features, training, saved LoRA, encoding, generation, v-prediction and caption
dropout, each against a slow reference written here from the stack's modules and the formulas; each
test also checks that the slip it guards against would be seen.
"""
import copy

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from diffattr import noise
from diffattr import train as training
from diffattr.featurize import batch_gradients, gradient_dim
from diffattr.functions import model_output
from diffattr.generate import ddim_scheduler, generation_labels, sample
from diffattr.ground_truth import query_losses
from diffattr.latent import LatentLoRA, encode_split
from diffattr.models import DROPPED, load_model
from diffattr.plan import Plan, path
from diffattr.protocol import ARTIFACTS, FUNCTIONS
from diffattr.sd_stack import load_components, save_components, tiny_components
from diffattr.settings import experiment
from diffattr.storage import file_sha256, read_array, write_array

from conftest import abar, assert_close, assert_far, velocity, watch_training

from dry_run import REPO

PROMPTS = ["a photo of the digit zero", "a photo of the digit one", "a photo of the digit two"]
BLOCKS = {"vae": {"sample_size": 8, "block_out_channels": [8, 16], "norm_num_groups": 8},
          "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                           "projection_dim": 16},
          "unet": {"sample_size": 4, "block_out_channels": [16, 32], "attention_head_dim": 8, "norm_num_groups": 8},
          "words": PROMPTS, "max_length": 8}
LATENT, IMAGE, SEED = (4, 4, 4), (1, 8, 8), 3
TRAIN = {"steps": 4, "batch_size": 4, "lr": 1e-2, "betas": [0.9, 0.999], "weight_decay": 0.0, "grad_clip": 1.0,
         "warmup_fraction": 0.0}
# every model-output function of the registry: the named ones and one of the interp<eta> family
ALL_FUNCTIONS = [*FUNCTIONS, "interp0.3"]


def stack(folder, seed, **blocks):
    """A tiny stack built from BLOCKS (each block's keys replaced by `blocks`'), saved to `folder`."""
    spec = {**BLOCKS, **{name: {**BLOCKS.get(name, {}), **value} for name, value in blocks.items()}}
    save_components(tiny_components(spec, seed), folder)
    return str(folder)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"eps": stack(root / "eps", 0), "v": stack(root / "v", 0, scheduler={"prediction_type": "v_prediction"}),
            "other": stack(root / "other", 1)}


def spec_of(base, **lora):
    return {"kind": "latent_lora", "pretrained": base, "prompts": PROMPTS, "lora": {"rank": 4, **lora}}


def lora_model(base, seed=SEED, perturb=True):
    """A LoRA model of `base`, its B matrices drawn away from zero when `perturb` (B = 0 at
    initialization makes every A's gradient zero and the LoRA the identity: checks would be vacuous)."""
    model = LatentLoRA.build(spec_of(base), seed)
    if perturb:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.featurized_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.train(False)


def double(model):
    model.unet.to(torch.float64)
    return model


def latents(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, *LATENT)).astype(np.float32))


def lora_state(model):
    return {name: p.detach().cpu().clone() for name, p in model.featurized_parameters()}


def test_the_latent_modules_import_first():
    """diffattr.latent and diffattr.models import each other: either may be a process's first import
    (the workflow's worker happens to import diffattr.models first; encode.py and base.py start with
    diffattr.latent)."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import diffattr.latent; from diffattr.models import KINDS; "
                             "print(sorted(KINDS))"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['latent_lora', 'pixel_ddpm']"


# ---------------------------------------------------------------- features

def loop_gradients(model, x0, labels, indices, function, timesteps, seed, target="eps"):
    """(B, p): per sample, one backward() of its mean f over the timesteps, read from p.grad."""
    params = [p for _, p in model.featurized_parameters()]
    rows = []
    for b in range(len(x0)):
        for p in params:
            p.grad = None
        values = []
        for t in timesteps:
            eps = torch.from_numpy(noise.gaussian(seed, indices[b], t, LATENT)).double()
            a = abar(model, t)
            x_t = a.sqrt() * x0[b] + (1 - a).sqrt() * eps
            pred = model.predict(x_t[None], torch.tensor([t]), model.conditioning(torch.tensor([labels[b]])))
            goal = eps if target == "eps" else x0[b]  # x0: a wrong target, for the can-fail check
            values.append(model_output(function, pred, goal[None], torch.tensor([t]), model.scheduler)[0])
        torch.stack(values).mean().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    for p in params:
        p.grad = None
    return torch.stack(rows)


@pytest.fixture(scope="module")
def featurized(bases):
    model = double(lora_model(bases["eps"])).for_per_sample_gradients()
    return model, latents(2, 1).double(), np.array([2, 0]), [5, 6], [10, 600]


@pytest.mark.parametrize("function", ALL_FUNCTIONS)
def test_lora_gradients_of_both_engines_equal_a_per_sample_backward_loop(featurized, function):
    model, x0, labels, indices, timesteps = featurized
    ref = loop_gradients(model, x0, labels, indices, function, timesteps, 7)
    for engine in ("hooks", "vmap"):
        got = batch_gradients(model, x0, indices, function, timesteps, 7, labels, engine=engine)
        assert got.shape == (2, gradient_dim(model))
        assert_close(got, ref, 1e-5)
    assert_far(got, loop_gradients(model, x0, labels[::-1].copy(), indices, function, timesteps, 7), 1e-5)
    if function in ("simple", "elbo", "interp0.3"):
        assert_far(got, loop_gradients(model, x0, labels, indices, function, timesteps, 7, "x0"), 1e-5)


def test_featurized_parameters_are_the_lora_ones_peft_trains(bases):
    model = lora_model(bases["eps"], perturb=False)
    names = [name for name, _ in model.featurized_parameters()]
    assert names and all("lora_" in name for name in names)
    assert gradient_dim(model) == sum(p.numel() for p in model.unet.parameters() if p.requires_grad)
    # rank r on each targeted Linear (in -> out): r (in + out) parameters, A and B
    targets = [m for name, m in model.unet.named_modules() if isinstance(m, torch.nn.Linear)
               and name.endswith(("to_q.base_layer", "to_k.base_layer", "to_v.base_layer", "to_out.0.base_layer"))]
    assert len(targets) == 4 * len(model.unet.attn_processors)  # q, k, v, out of every attention
    assert gradient_dim(model) == sum(4 * (m.in_features + m.out_features) for m in targets)


# ---------------------------------------------------------------- training, saving, loading

@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    """A LoRA trained by train_and_save on a latent store, the model it trained (caught on its way
    in) and the folder it saved."""
    root = tmp_path_factory.mktemp("trained")
    write_array(root / "train.zarr", latents(6).numpy(), {"labels": [0, 1, 2, 2, 1, 0]})
    spec = {**TRAIN, "model": spec_of(bases["eps"])}
    caught = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "build_model", lambda s, seed: caught.append(LatentLoRA.build(s, seed)) or caught[0])
        training.train_and_save(root / "train.zarr", None, None, SEED, spec, root / "model" / ARTIFACTS["weights"])
    return {"model": caught[0], "folder": root / "model", "spec": spec["model"]}


def assert_only_the_lora_changed(model, base, spec):
    """`model`'s VAE, text encoder and UNet are bitwise those of the stack at `base`, and every LoRA
    parameter differs from its initial value under `spec`, in fp32."""
    fresh = load_components(base)
    for ours, theirs in ((model.vae, fresh.vae), (model.text_encoder, fresh.text_encoder)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(),
                                                     strict=True))
    frozen = {name.replace(".base_layer", ""): value for name, value in model.unet.state_dict().items()
              if "lora_" not in name}
    assert frozen.keys() == fresh.unet.state_dict().keys()
    assert all(torch.equal(frozen[name], value) for name, value in fresh.unet.state_dict().items())
    initial = lora_state(LatentLoRA.build(spec, SEED))
    changed = [not torch.equal(p, initial[name]) for name, p in lora_state(model).items()]
    assert all(changed) and all(p.dtype == torch.float32 for p in lora_state(model).values())


def test_training_changes_only_the_lora(bases, trained):
    assert_only_the_lora_changed(trained["model"], bases["eps"], trained["spec"])


def test_bf16_training_follows_fp32_and_changes_only_the_fp32_lora(bases):
    """Mixed precision on the CPU (bf16 autocast): each step's loss is within bf16's rounding of the fp32
    training's but not equal to it (autocast took effect); the LoRA is trained in fp32, the base untouched."""
    images, labels = latents(8, 9), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    spec = {**TRAIN, "steps": 4, "hflip": True, "caption_dropout": 0.2}
    losses, trained = {}, {}
    for dtype in ("fp32", "bf16"):
        model = LatentLoRA.build(spec_of(bases["eps"]), SEED)
        log = training.train(model, images, labels, {**spec, "dtype": dtype}, SEED, flipped=latents(8, 10))
        losses[dtype], trained[dtype] = log["loss"].to_numpy(copy=True), model
    assert_close(losses["bf16"], losses["fp32"], 2e-2)
    assert not np.array_equal(losses["bf16"], losses["fp32"])
    assert_only_the_lora_changed(trained["bf16"], bases["eps"], spec_of(bases["eps"]))


def test_saved_lora_loads_bitwise_and_in_diffusers(bases, trained):
    from diffusers import StableDiffusionPipeline

    folder, model = trained["folder"], trained["model"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*LatentLoRA.artifact_files, "train_log.csv", training.TRAINING_RECORD])
    loaded = load_model(trained["spec"], folder)
    got, want = lora_state(loaded), lora_state(model)
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)

    pipe = StableDiffusionPipeline.from_pretrained(bases["eps"], safety_checker=None)
    pipe.load_lora_weights(folder, weight_name=LatentLoRA.weights_file)
    x, t, cond = latents(3, 2), torch.tensor([5, 500, 990]), loaded.conditioning(torch.tensor([0, 1, DROPPED]))
    with torch.no_grad():
        ours = loaded.predict(x, t, cond)
        assert_close(pipe.unet(x, t, encoder_hidden_states=cond).sample, ours, 1e-5)
        pipe.unet.disable_lora()
        assert_far(pipe.unet(x, t, encoder_hidden_states=cond).sample, ours, 1e-5)
    with pytest.raises(ValueError, match="trained on the base"):
        load_model({**trained["spec"], "pretrained": bases["other"]}, folder)


# ---------------------------------------------------------------- encoding

def test_latents_are_the_vaes_scaled_mode_encoded_once(bases, tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (5, *IMAGE)).astype(np.float32)
    write_array(tmp_path / "images.zarr", images, {"labels": [0, 1, 2, 0, 1]})
    for name, flipped in (("a", False), ("b", False), ("f", True)):
        encode_split(bases["eps"], tmp_path / "images.zarr", tmp_path / f"{name}.zarr", flipped, 2)
    (a, attrs), (b, _), (f, _) = (read_array(tmp_path / f"{name}.zarr") for name in "abf")
    assert a.shape == (5, *LATENT) and np.array_equal(a, b) and attrs["labels"] == [0, 1, 2, 0, 1]
    vae = load_components(bases["eps"]).vae
    with torch.no_grad():
        def hand(x):
            return vae.encode(torch.from_numpy(x.copy())).latent_dist.mode() * vae.config.scaling_factor
        assert_close(a, hand(images), 1e-6)
        assert_close(f, hand(images[..., ::-1]), 1e-6)
        assert_far(f, hand(images), 1e-6)

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    plan = Plan("sd-digits", experiment(config, "sd-digits"))
    e, stores = "sd-digits", {split: path("images", experiment="sd-digits", split=split) for split in ("train", "val")}
    for split in ("train", "val"):
        assert plan.samples(split) == path("latents", experiment=e, split=split)
    assert plan.samples("gen") == path("generated", experiment=e)
    assert plan.images("gen") == path("decoded", experiment=e)
    assert plan.train_inputs() == {"images": path("latents", experiment=e, split="train"),
                                   "flipped": path("latents_flipped", experiment=e, split="train")}
    model_inputs = [*plan.train_inputs().values(), *(plan.samples(s) for s in ("train", "val", "gen"))]
    assert not set(stores.values()) & set(model_inputs)
    assert plan.jobs()["encode"] == [path("latents", experiment=e, split=s) for s in ("train", "val")]


# ---------------------------------------------------------------- generation

@torch.no_grad()
def hand_guided_ddim(model, index, label, steps, seed, guidance):
    """Sample `index` by a DDIM loop (eta 0) written from its update rule, the prediction u + w (c - u); float64."""
    ddim = ddim_scheduler(model, steps)
    x = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed + index)).double()
    c, u = model.conditioning(torch.tensor([label])), model.conditioning(torch.tensor([DROPPED]))
    for t in ddim.timesteps.tolist():
        a, prev = abar(model, t), t - ddim.config.num_train_timesteps // steps
        a_prev = abar(model, prev) if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        out_c, out_u = (model.predict(x[None], torch.tensor([t]), cond)[0] for cond in (c, u))
        out = out_u + guidance * (out_c - out_u)
        if model.scheduler.config.prediction_type == "v_prediction":
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        else:
            x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_guided_samples_follow_a_hand_ddim_loop_at_any_batch_size(bases, kind):
    model = lora_model(bases[kind])
    labels, args = generation_labels(model, 4), (LATENT, 4, 0.0, 11)
    batch = sample(model, 4, *args, batch_size=4, labels=labels, guidance=3.0)
    for size in (1, 2):  # float32 kernels sum in another order at another batch size: rounding only
        assert_close(sample(model, 4, *args, batch_size=size, labels=labels, guidance=3.0), batch, 1e-5)
    reference = double(lora_model(bases[kind]))
    assert_close(batch[1], hand_guided_ddim(reference, 1, labels[1], 4, 11, 3.0), 1e-5)
    assert_far(batch[1], hand_guided_ddim(reference, 1, labels[1], 4, 11, 1.0), 1e-5)


# ---------------------------------------------------------------- v-prediction

def replayed_batch(images, flipped, spec, seed):
    """train's draws of step 0: the permutation, the flips, t, the noise, the caption dropout."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(images), generator=gen)[:spec["batch_size"]]
    flip = torch.rand(len(index), generator=gen) < 0.5
    x0 = torch.where(flip[:, None, None, None], flipped[index], images[index]).double()
    t = torch.randint(0, 1000, (len(index),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen).double()
    drop = torch.rand(len(index), generator=gen) < spec["caption_dropout"]
    return index, x0, t, eps, drop


@torch.no_grad()
def hand_loss(model, x0, t, eps, label, target):
    """||pred - target||^2 / d for one sample at one timestep."""
    a = abar(model, t)
    pred = model.predict((a.sqrt() * x0 + (1 - a).sqrt() * eps)[None], torch.tensor([t]),
                         model.conditioning(torch.tensor([label])))[0]
    goal = velocity(model, x0, eps, t) if target == "v" else eps
    return ((pred - goal) ** 2).mean().item()


def test_v_prediction_trains_and_measures_the_velocity_error(bases):
    images, flipped, labels = latents(6, 3), latents(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    spec = {**TRAIN, "steps": 1, "hflip": True, "caption_dropout": 0.5}
    log = training.train(LatentLoRA.build(spec_of(bases["v"]), SEED), images, labels, spec, SEED, flipped=flipped)
    model = double(lora_model(bases["v"], perturb=False))  # step 0's weights: B = 0
    index, x0, t, eps, drop = replayed_batch(images, flipped, spec, SEED)
    assert drop.any() and not drop.all()
    label = [DROPPED if drop[j] else int(labels[i]) for j, i in enumerate(index.tolist())]

    def loss(target, label):
        return np.mean([hand_loss(model, x0[j], int(t[j]), eps[j], label[j], target) for j in range(len(index))])

    assert_close(log["loss"][0], loss("v", label), 1e-5)
    assert_far(log["loss"][0], loss("eps", label), 1e-5)
    assert_far(log["loss"][0], loss("v", [int(labels[i]) for i in index.tolist()]), 1e-5)

    # ground truth and the simple / elbo functions of a trained-looking model (B != 0), by hand
    model, queries, qlabels, timesteps, seeds = lora_model(bases["v"]), latents(3, 5), np.array([1, 0, 2]), [10, 700], [0, 1]
    reference = double(lora_model(bases["v"]))
    betas = reference.scheduler.betas.double()

    def hand(target, weighted):
        rows = []
        for i in range(len(queries)):
            values = []
            for t in timesteps:
                w = betas[t] / (2 * (1 - betas[t]) * (1 - abar(reference, t))) if weighted else 1.0
                values += [float(w) * hand_loss(reference, queries[i].double(),
                                                t, torch.from_numpy(noise.gaussian(s, i, t, LATENT)).double(),
                                                int(qlabels[i]), target) for s in seeds]
            rows.append(np.mean(values))
        return rows

    for function, weighted in (("simple", False), ("elbo", True)):
        got = query_losses(model, queries.numpy(), timesteps, seeds, 4, function=function, labels=qlabels)
        assert_close(got, hand("v", weighted), 1e-5)
        assert_far(got, hand("eps", weighted), 1e-5)


# ---------------------------------------------------------------- caption dropout

def recorded_labels(model, monkeypatch):
    seen, real = [], model.conditioning
    monkeypatch.setattr(model, "conditioning", lambda labels: seen.append(labels.clone()) or real(labels))
    return seen


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_caption_dropout_conditions_on_the_empty_prompt(bases, monkeypatch, dropout):
    images, labels = latents(6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    model = LatentLoRA.build(spec_of(bases["eps"]), SEED)
    seen = recorded_labels(model, monkeypatch)
    spec = {**TRAIN, "steps": 3, "caption_dropout": dropout}
    training.train(model, images, labels, spec, SEED)
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(6, generator=gen)
    assert len(seen) == 3
    assert torch.equal(seen[0], torch.full((4,), DROPPED) if dropout else labels[order[:4]])
    assert all((got == DROPPED).all() if dropout else (got != DROPPED).all() for got in seen)


def test_dropped_label_is_the_empty_prompts_embedding(bases):
    model = lora_model(bases["eps"])
    with torch.no_grad():
        def encoded(prompt):
            ids = model.tokenizer([prompt], padding="max_length", max_length=model.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
            return model.text_encoder(ids)[0][0]
        got = model.conditioning(torch.tensor([2, DROPPED, 0, 1]))
        for row, prompt in zip(got, [PROMPTS[2], "", PROMPTS[0], PROMPTS[1]]):
            assert torch.equal(row, encoded(prompt))
    assert not torch.equal(got[0], got[1]) and not torch.equal(got[2], got[3])


# ---------------------------------------------------------------- kill and resume

class Crash(Exception):
    """Stands for a kill."""


def assert_lora_training_resumes_bitwise(base, checkpoint, dtype, device=torch.device("cpu"), **options) -> list:
    """A LoRA training on `device` in `dtype` (with train `options`), killed after its second checkpoint
    and rerun, ends bitwise as an uninterrupted one (weights and loss log) and trained. Returns the
    states handed to the two checkpoints (their tensors may alias the training's)."""
    images, flipped, labels = latents(6, 7), latents(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    spec = {**TRAIN, "steps": 6, "hflip": True, "caption_dropout": 0.3, "checkpoint_every": 2, "dtype": dtype,
            **options}
    build = lambda: LatentLoRA.build({**spec_of(base), "attention_dropout": 0.5}, SEED)
    reference = build()
    reference_log = training.train(reference, images, labels, spec, SEED, device, flipped=flipped)
    real, saved = training._save_checkpoint, []

    def killed_after_second(path, state):
        real(path, state)
        saved.append(state)
        if len(saved) == 2:
            raise Crash

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "_save_checkpoint", killed_after_second)
        with pytest.raises(Crash):
            training.train(build(), images, labels, spec, SEED, device, checkpoint=checkpoint, flipped=flipped)
    assert [state["step"] for state in saved] == [2, 4]
    resumed = build()
    torch.manual_seed(999)  # whatever the global RNG holds (attention dropout draws from it): restored
    log = training.train(resumed, images, labels, spec, SEED, device, checkpoint=checkpoint, flipped=flipped)
    got, want = lora_state(resumed), lora_state(reference)
    assert all(torch.equal(got[name], want[name]) for name in want)
    pd.testing.assert_frame_equal(log, reference_log, check_exact=True)
    assert not any(torch.equal(p, lora_state(build())[name]) for name, p in got.items() if "lora_B" in name)
    return saved


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: mixed precision (autocast) on the CPU
def test_lora_training_resumed_after_a_kill_is_bitwise_an_uninterrupted_one(bases, tmp_path, dtype):
    assert_lora_training_resumes_bitwise(bases["eps"], tmp_path / ".model.ckpt", dtype)


@pytest.mark.parametrize("options", [{"channels_last": True}, pytest.param({"compile": True}, marks=pytest.mark.slow)],
                         ids=["channels_last", "compile"])
def test_lora_training_with_a_speed_option_resumes_bitwise(bases, tmp_path, monkeypatch, options):
    """train.channels_last (the whole UNet, its frozen base too, and the latents in channels_last) and
    train.compile (the UNet compiled, attention dropout 0.5 included), each seen to take effect."""
    seen = watch_training(monkeypatch, LatentLoRA)
    assert_lora_training_resumes_bitwise(bases["eps"], tmp_path / ".model.ckpt", "fp32", **options)
    assert seen and all(s["input"] == s["weights"] == options.get("channels_last", False) for s in seen)
    assert all(s["compiled"] == options.get("compile", False) for s in seen)


@pytest.mark.parametrize("options", [{"channels_last": True}, pytest.param({"compile": True}, marks=pytest.mark.slow)],
                         ids=["channels_last", "compile"])
def test_lora_training_with_a_speed_option_follows_the_ordinary_one_and_saves_the_same_lora(bases, tmp_path, options):
    """Without attention dropout, the losses and LoRA within float rounding of the ordinary training's,
    the base untouched; the saved LoRA loads bitwise as the trained one, every weight back in the ordinary
    layout and the UNet uncompiled."""
    write_array(tmp_path / "train.zarr", latents(8, 9).numpy(), {"labels": [0, 1, 2, 0, 1, 2, 0, 1]})
    spec = {**TRAIN, "steps": 4, "caption_dropout": 0.2, "model": spec_of(bases["eps"])}
    logs, trained = {}, {}
    for name, extra in (("plain", {}), ("option", options)):
        caught = []
        with pytest.MonkeyPatch.context() as patch:
            seen = watch_training(patch, LatentLoRA)
            patch.setattr(training, "build_model",
                          lambda s, seed: caught.append(LatentLoRA.build(s, seed)) or caught[0])
            weights = tmp_path / name / ARTIFACTS["weights"]
            training.train_and_save(tmp_path / "train.zarr", None, None, SEED, {**spec, **extra}, weights)
        assert len(seen) == spec["steps"]
        assert all(s["input"] == s["weights"] == extra.get("channels_last", False) for s in seen)
        assert all(s["compiled"] == extra.get("compile", False) for s in seen)
        model = caught[0]
        assert all(p.is_contiguous() for p in model.unet.parameters()) and model.unet._compiled_call_impl is None
        assert_only_the_lora_changed(model, bases["eps"], spec["model"])
        got, want = lora_state(load_model(spec["model"], weights.parent)), lora_state(model)
        assert all(torch.equal(got[key], want[key]) for key in want)
        logs[name], trained[name] = pd.read_csv(weights.parent / ARTIFACTS["loss_log"]), want
    assert_close(logs["option"]["loss"].to_numpy(copy=True), logs["plain"]["loss"].to_numpy(copy=True), 1e-5)
    for key, value in trained["plain"].items():
        assert_close(trained["option"][key], value, 1e-3)  # AdamW magnifies rounding of small gradients


# ---------------------------------------------------------------- CUDA

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_training_and_features_on_the_gpu_follow_the_cpu(bases):
    """Both devices train in the default train.dtype, fp32 (no TF32)."""
    images, labels = latents(8, 9), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    spec = {**TRAIN, "steps": 3, "hflip": True, "caption_dropout": 0.2}
    trained, grads = {}, {}
    for device in (CPU, CUDA):
        model = LatentLoRA.build(spec_of(bases["eps"]), SEED)
        log = training.train(model, images, labels, spec, SEED, device, flipped=latents(8, 10))
        trained[device.type] = (torch.cat([p.detach().cpu().reshape(-1) for _, p in model.featurized_parameters()]),
                                log["loss"].to_numpy())
        model = lora_model(bases["eps"]).to(device).for_per_sample_gradients()
        from diffattr.device import precision
        with precision("fp32", device):
            grads[device.type] = batch_gradients(model, latents(4, 11).to(device), range(4), "simple", [10, 500],
                                                 3, np.array([0, 1, 2, 0])).cpu()
    np.testing.assert_allclose(trained["cuda"][1], trained["cpu"][1], rtol=1e-4)
    assert rel(trained["cuda"][0], trained["cpu"][0]) < 1e-4
    assert rel(grads["cuda"], grads["cpu"]) < 1e-5


def test_the_planners_latent_kinds_are_the_kinds_that_store_latents():
    """diffattr.plan (no torch) knows the latent kinds by name (protocol.LATENT_KINDS); the model
    layer by their `stores_latents`: the two lists must agree."""
    from diffattr.models import KINDS
    from diffattr.protocol import LATENT_KINDS

    assert {name for name, kind in KINDS.items() if kind.stores_latents} == set(LATENT_KINDS)
