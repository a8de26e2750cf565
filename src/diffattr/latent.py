"""The latent Stable Diffusion kind: a frozen base (VAE, CLIP text encoder, UNet2DConditionModel) from a
diffusers Stable Diffusion directory, and LoRA adapters on the UNet's attention projections, the only
parameters trained, saved and featurized (D-TRAK's text-to-image setting: miniSD LoRA-finetuned on ArtBench).

What we follow: diffusers' LoRA training example (examples/text_to_image/train_text_to_image_lora.py),
which the reference code (sail-sg/D-TRAK, ArtBench2/ArtBench5) builds on: peft LoRA of rank r with
alpha r on `to_q`, `to_k`, `to_v`, `to_out.0`, gaussian initialization (A ~ N(0, 1/r), B = 0), saved
with `StableDiffusionPipeline.save_lora_weights` under the workflow's one weights name (ARTIFACTS), so
`pipe.load_lora_weights(folder, weight_name="diffusion_pytorch_model.safetensors")` reads a model of this kind.
Where we differ: images are encoded once per split by the `encode` rule (`vae_latents`: the VAE
posterior's mode times its scaling factor; the train split's mirror images too, for training's random
flips), where the reference's training samples the posterior at every step; its ground truth and
gradients take the mode, as we do everywhere. So a split's store here holds latents, `encode` is the
identity and no stage runs the VAE encoder. Class label c is conditioned on `prompts[c]`, label DROPPED on the empty prompt: caption
dropout's and classifier-free guidance's unconditional branch.

A model on disk is its LoRA (megabytes) and `base.json`, the base it was trained on: its directory and
a checksum of the base UNet's weights, which loading holds against the config's base.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig

from .models import DROPPED, KINDS, DiffusionModel
from .protocol import ARTIFACTS
from .sd_stack import TINY
from .storage import file_sha256

BASE_RECORD = "base.json"
LORA_DEFAULTS = {"rank": 128, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "init": "gaussian"}


@torch.no_grad()
def vae_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> latents: the VAE posterior's mode times its scaling factor. Deterministic,
    as the reference's ground truth and gradients encode; its training draws `latent_dist.sample()`
    at every step instead (docs/methods.md: where we differ)."""
    return vae.encode(images.to(vae.dtype)).latent_dist.mode().float() * vae.config.scaling_factor


def lora_settings(spec: dict | None) -> dict:
    """The `model.lora` block over LORA_DEFAULTS. Alpha is the rank (a scale of 1, the reference's): the
    weights file diffusers reads holds no alpha, so any other would load at the wrong scale."""
    return {**LORA_DEFAULTS, **(spec or {})}


@functools.lru_cache(maxsize=8)
def _base_digest(unet_weights: str, size: int, mtime_ns: int) -> str:
    return file_sha256(unet_weights)


def base_digest(pretrained) -> str:
    """Checksum of a base's UNet weights (once per file and process: miniSD's take seconds to hash)."""
    path = min(p for p in (Path(pretrained) / "unet").iterdir() if p.suffix in (".safetensors", ".bin"))
    stat = path.stat()
    return _base_digest(str(path), stat.st_size, stat.st_mtime_ns)


class LatentLoRA(DiffusionModel):
    artifact_files = (ARTIFACTS["weights"], BASE_RECORD)
    stores_latents = True
    # the embedded base's networks (diffattr.latent_base), each block over sd_stack.TINY's
    config_blocks = {"base.vae": AutoencoderKL, "base.text_encoder": CLIPTextConfig,
                     "base.unet": UNet2DConditionModel, "base.scheduler": DDPMScheduler}
    # the model block's own keys: the base's directory (null: the workflow builds it from `base`), one
    # prompt per class label, the LoRA's settings, the training's attention dropout (the reference's 0.1)
    # and the embedded base's recipe (diffattr.latent_base)
    config_keys = ("pretrained", "prompts", "lora", "attention_dropout", "base")

    def __init__(self, components, prompts: list[str], lora: dict | None, pretrained=None,
                 attention_dropout: float = 0.0):
        """`components` (diffattr.sd_stack.Components) frozen, with LoRA adapters `lora` (lora_settings'
        keys) added to the UNet; `lora` None trains the whole UNet instead (the embedded base's own
        training, diffattr.latent_base). `attention_dropout`: the p of the UNet attention's dropout
        layers while training (the reference's 0.1; eval mode, hence ground truth and features, has none)."""
        self.unet, self.vae = components.unet, components.vae
        self.text_encoder, self.tokenizer = components.text_encoder, components.tokenizer
        self.scheduler = components.scheduler
        self.prompts, self.lora, self.pretrained = list(prompts), lora, pretrained
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        if lora is None:
            self.unet.requires_grad_(True)
        else:
            from peft import LoraConfig

            self.unet.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["rank"], init_lora_weights=lora["init"],
                                             target_modules=list(lora["target_modules"])))
        for name, module in self.unet.named_modules():
            if "attn" in name and isinstance(module, torch.nn.Dropout):
                module.p = float(attention_dropout)
        self._embeddings = None

    @classmethod
    def block_arguments(cls, block, spec):
        return {**TINY[block.split(".")[-1]], **(spec or {})}

    @property
    def num_classes(self):
        return len(self.prompts)

    @classmethod
    def build(cls, spec: dict, seed: int) -> "LatentLoRA":
        from .sd_stack import load_components

        components = load_components(spec["pretrained"])
        torch.manual_seed(seed)  # the LoRA's initial A matrices are a function of the training seed
        return cls(components, spec["prompts"], lora_settings(spec.get("lora")), spec["pretrained"],
                   float(spec.get("attention_dropout", 0.0)))

    @classmethod
    def load(cls, directory, spec: dict) -> "LatentLoRA":
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        record = json.loads((directory / BASE_RECORD).read_text())
        if record["unet_sha256"] != base_digest(spec["pretrained"]):
            raise ValueError(f"{directory}: trained on the base {record['pretrained']} (UNet sha256 "
                             f"{record['unet_sha256'][:12]}...), not on model.pretrained = {spec['pretrained']}")
        model = cls.build(spec, seed=0)
        state = {key.removeprefix("unet."): value for key, value in load_file(directory / cls.weights_file).items()}
        result = set_peft_model_state_dict(model.unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{directory / cls.weights_file}: keys {result.unexpected_keys[:3]}... are not "
                             f"LoRA weights of this UNet with model.lora = {model.lora}")
        return model

    def save(self, directory) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        directory = Path(directory)
        # contiguous: safetensors refuses a channels_last tensor (a conv LoRA's, saved while train.channels_last
        # trains); the values, hence the file's bytes, are the same in either layout
        layers = {key: value.contiguous() for key, value in
                  convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet)).items()}
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, weight_name=self.weights_file,
                                                  safe_serialization=True)
        (directory / BASE_RECORD).write_text(json.dumps(
            {"pretrained": str(self.pretrained), "unet_sha256": base_digest(self.pretrained),
             "lora": self.lora, "prompts": self.prompts}, indent=1) + "\n")

    def encode(self, images):
        return images  # a split's store holds its latents already (the encode rule: `vae_latents`)

    def encode_images(self, images):
        return vae_latents(self.vae, images)

    @torch.no_grad()
    def decode(self, x0):
        vae = self.vae
        return vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample.float()

    @torch.no_grad()
    def _prompt_embeddings(self) -> torch.Tensor:
        """(classes + 1, L, D): the text encoder's last hidden states of each prompt, then of the empty
        prompt (row -1 = DROPPED), computed once: the text encoder is frozen."""
        if self._embeddings is None:
            tokens = self.tokenizer([*self.prompts, ""], padding="max_length", truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt")
            device = self.text_encoder.device
            self._embeddings = self.text_encoder(tokens.input_ids.to(device))[0].float()
        return self._embeddings

    def conditioning(self, labels):
        if labels is None:
            raise ValueError("latent_lora: every image needs its class label (its prompt)")
        table = self._prompt_embeddings()
        labels = labels.long().to(table.device)
        return table[torch.where(labels == DROPPED, len(self.prompts), labels)]

    def unconditional(self, n: int) -> torch.Tensor:
        """The empty prompt's conditioning for n images: classifier-free guidance's other branch."""
        return self.conditioning(torch.full((n,), DROPPED))

    def latent_shape(self):
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def predict(self, x_t, t, cond=None):
        return self.unet(x_t, t.to(x_t.device), encoder_hidden_states=cond.to(x_t.dtype)).sample

    def predict_with(self, params, x_t, t, cond=None):
        return torch.func.functional_call(self.unet, params, (x_t, t.to(x_t.device)),
                                          {"encoder_hidden_states": cond.to(x_t.dtype)}).sample

    def network(self):
        return self.unet

    def train(self, mode=True):
        self.unet.train(mode)  # VAE and text encoder stay in eval mode: they are frozen
        return self

    def to(self, device):
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        self._embeddings = None
        return self

    def for_per_sample_gradients(self):
        from diffusers.models.attention_processor import AttnProcessor

        self.unet.set_attn_processor(AttnProcessor())  # see PixelDDPM.for_per_sample_gradients
        return self


KINDS["latent_lora"] = LatentLoRA


def encode_split(pretrained, images_path, out_path, flipped: bool, batch_size: int,
                 device: torch.device = torch.device("cpu")) -> None:
    """The latents of a split's images (or, `flipped`, of their mirror images) under the base's VAE
    (`encode_images`), with the image store's labels and a record of what made them."""
    from .sd_stack import load_components
    from .storage import array_sha256, read_array, write_array

    images, attrs = read_array(images_path)
    vae = load_components(pretrained).vae.to(device)
    source = images[..., ::-1].copy() if flipped else images
    latents = torch.cat([vae_latents(vae, torch.from_numpy(source[i:i + batch_size]).to(device)).cpu()
                         for i in range(0, len(source), batch_size)]).numpy()
    write_array(out_path, latents, {**attrs, "encoded_by": str(pretrained), "base_unet_sha256": base_digest(pretrained),
                                    "vae_scaling_factor": float(vae.config.scaling_factor), "flipped": bool(flipped),
                                    "images_sha256": array_sha256(images)})
