"""diffattr.sd_stack: a Stable Diffusion directory read, built tiny, saved and its VAE trained."""
import copy
import subprocess
import sys

import pytest
import torch

from diffattr.sd_stack import (PARTS, TINY, check_pretrained, load_components, local_tokenizer, save_components,
                               tiny_components, train_vae)

torch.set_num_threads(1)

# Smaller than the module's defaults: 8x8 one-channel images, 4x4x4 latents.
SPEC = {
    "vae": {"in_channels": 1, "out_channels": 1, "sample_size": 8, "block_out_channels": [8, 16],
            "norm_num_groups": 4},
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "projection_dim": 16},
    "unet": {"sample_size": 4, "block_out_channels": [16, 32], "attention_head_dim": 4},
    "words": ["a photo of the digit", "zero", "one", "seven", "eleven"],
    "max_length": 8,
}
MODULES = ("unet", "vae", "text_encoder")


def blobs(n=32, size=8, seed=0):
    """`n` smooth one-channel images in [-1, 1]: a Gaussian blob at a random place, of a random width."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.arange(size, dtype=torch.float32)
    centre = torch.rand(n, 2, generator=gen) * (size - 1)
    width = 1.0 + 2.0 * torch.rand(n, 1, 1, generator=gen)
    distance = (grid[None, :, None] - centre[:, 0, None, None]) ** 2 + (grid[None, None, :] - centre[:, 1, None, None]) ** 2
    return (2 * torch.exp(-distance / (2 * width ** 2)) - 1)[:, None]


@pytest.fixture(scope="module")
def tiny():
    return tiny_components(copy.deepcopy(SPEC), seed=0)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "base"
    save_components(tiny, path)
    return path


def test_module_import_is_cheap():
    code = "import sys, diffattr.sd_stack; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_check_pretrained_names_the_key_the_missing_part_and_the_download(saved, tmp_path):
    assert check_pretrained(saved) is None
    missing = check_pretrained(tmp_path / "nowhere")
    assert missing.startswith("model.pretrained: ") and "not a directory" in missing
    assert "huggingface-cli download lambdalabs/miniSD-diffusers --local-dir" in missing
    for part in PARTS:
        assert f"{part}/" in missing
    for part in PARTS:
        broken = tmp_path / part
        subprocess.run(["cp", "-r", str(saved), str(broken)], check=True)
        subprocess.run(["rm", "-r", str(broken / part)], check=True)
        line = check_pretrained(broken)
        assert f"has no {part}/;" in line and "\n" not in line
        with pytest.raises(FileNotFoundError, match=f"has no {part}/;"):
            load_components(broken)
    weightless = tmp_path / "weightless"
    subprocess.run(["cp", "-r", str(saved), str(weightless)], check=True)
    (weightless / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert "has no unet/*.safetensors or *.bin;" in check_pretrained(weightless)


def test_local_tokenizer_round_trips_without_unknown_tokens(tmp_path):
    words = ["a", "photo", "of", "the", "digit", "seven", "eleven", "even", "eve", "seventeen"]
    tokenizer = local_tokenizer(tmp_path, words, max_length=12)
    assert {p.name for p in tmp_path.iterdir()} >= {"vocab.json", "merges.txt"}
    assert tokenizer.model_max_length == 12
    prompts = ["a photo of the digit seven", "a photo of the digit eleven", "seven eleven", "eleven seven",
               "even eve", "eve even", "seventeen", "seven teen", "the", "tthe", "a digit of the photo"]
    seen = set()
    for prompt in prompts:
        ids = tokenizer(prompt, padding="max_length", max_length=12, truncation=True).input_ids
        plain = tokenizer(prompt, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in plain, prompt  # the unknown token is <|endoftext|>, as CLIP's
        assert ids[0] == tokenizer.bos_token_id and ids[len(plain) + 1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
        seen.add(tuple(ids))
    assert len(seen) == len(prompts)
    assert len(tokenizer("a photo of the digit seven").input_ids) == 2 + 6  # a token per word
    whole = local_tokenizer(tmp_path / "default", TINY["words"], max_length=16)
    for word in TINY["words"]:
        assert len(whole(word, add_special_tokens=False).input_ids) == 1, word
    with pytest.raises(ValueError, match="words"):
        local_tokenizer(tmp_path, ["Seven"], 8)


def test_tiny_components_is_a_consistent_frozen_stack_seeded_by_seed(tiny):
    text, unet = tiny.text_encoder.config, tiny.unet.config
    assert text.vocab_size == len(tiny.tokenizer) and text.max_position_embeddings == tiny.tokenizer.model_max_length
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id, tiny.tokenizer.pad_token_id)
    assert unet.cross_attention_dim == text.hidden_size
    for name in MODULES:
        module = getattr(tiny, name)
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    again, other = tiny_components(copy.deepcopy(SPEC), seed=0), tiny_components(copy.deepcopy(SPEC), seed=1)
    for name in MODULES:
        mine, same, different = (getattr(c, name).state_dict() for c in (tiny, again, other))
        assert all(torch.equal(mine[k], same[k]) for k in mine)
        assert not all(torch.equal(mine[k], different[k]) for k in mine)
    ids = tiny.tokenizer(["a photo of the digit seven"] * 2, padding="max_length", max_length=8, return_tensors="pt")
    hidden = tiny.text_encoder(ids.input_ids).last_hidden_state
    latents = torch.randn(2, 4, 4, 4)
    assert tiny.unet(latents, torch.tensor([10, 500]), hidden).sample.shape == latents.shape
    assert tiny.vae.encode(torch.zeros(2, 1, 8, 8)).latent_dist.mode().shape == latents.shape


@pytest.mark.parametrize("block, key, value, message", [
    ("unet", "cross_attention_dim", 24, r"model\.base\.unet\.cross_attention_dim: got 24; expected 16"),
    ("text_encoder", "max_position_embeddings", 4, r"model\.base\.text_encoder\.max_position_embeddings: got 4"),
    ("text_encoder", "vocab_size", 3, r"model\.base\.text_encoder\.vocab_size: got 3"),
])
def test_tiny_components_refuses_an_inconsistent_stack(block, key, value, message):
    spec = copy.deepcopy(SPEC)
    spec[block][key] = value
    with pytest.raises(ValueError, match=message):
        tiny_components(spec, seed=0)


def test_saved_directory_reads_back_bitwise_and_loads_as_a_pipeline(tiny, saved):
    from diffusers import StableDiffusionPipeline

    loaded = load_components(saved)
    for name in MODULES:
        mine, theirs = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), (name, key)
        assert not getattr(loaded, name).training
        assert not any(p.requires_grad for p in getattr(loaded, name).parameters())
    settings = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in (loaded.scheduler, tiny.scheduler)]
    assert settings[0] == settings[1]
    assert torch.equal(loaded.scheduler.betas, tiny.scheduler.betas)
    assert loaded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert loaded.tokenizer.model_max_length == tiny.tokenizer.model_max_length
    prompt = "a photo of the digit eleven"
    assert loaded.tokenizer(prompt).input_ids == tiny.tokenizer(prompt).input_ids
    pipeline = StableDiffusionPipeline.from_pretrained(saved, safety_checker=None)
    images = pipeline(prompt, num_inference_steps=2, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 8, 8) and torch.isfinite(images).all()


def test_an_interrupted_save_leaves_no_directory(tiny, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny.scheduler), "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        save_components(tiny, tmp_path / "base")
    assert list(tmp_path.iterdir()) == []


TRAIN = {"steps": 60, "batch_size": 8, "lr": 3e-3, "weight_decay": 0.0, "kl_weight": 1e-6}


def reconstruction_mse(vae, images):
    with torch.no_grad():
        return (vae.decode(vae.encode(images).latent_dist.mode()).sample - images).pow(2).mean().item()


def test_train_vae_is_deterministic(tiny):
    images, spec = blobs(16), {**TRAIN, "steps": 5}
    runs = []
    for _ in range(2):
        vae = copy.deepcopy(tiny.vae)
        runs.append((train_vae(vae, images, spec, seed=3), vae))
    (log_a, vae_a), (log_b, vae_b) = runs
    assert log_a.equals(log_b) and list(log_a.columns) == ["step", "loss", "mse", "kl", "grad_norm"]
    assert vae_a.config.scaling_factor == vae_b.config.scaling_factor
    a, b = vae_a.state_dict(), vae_b.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_vae_reconstructs_and_scales_latents_to_unit_std(tiny):
    images, vae = blobs(32), copy.deepcopy(tiny.vae)
    untrained = reconstruction_mse(vae, images)
    log = train_vae(vae, images, TRAIN, seed=0)
    trained = reconstruction_mse(vae, images)
    assert len(log) == TRAIN["steps"] and trained < 0.2 * untrained, (untrained, trained)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
    assert abs(latents.std().item() - 1.0) < 1e-4
    assert vae.config.scaling_factor != tiny.vae.config.scaling_factor
