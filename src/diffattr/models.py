"""The model layer: what the trainer, generator, ground truth and featurizer need of a diffusion model.

Every stage talks to a `DiffusionModel` and to nothing else of the model: `encode` / `decode` between
images in [-1, 1] and the space where diffusion runs, `conditioning` of each image's class label,
the network's `predict`ion and its training `target` (eps or v, the scheduler's prediction_type),
the parameters to featurize, and the files a saved model consists of. The pixel-space DDPM below
is the first kind; the latent Stable Diffusion with LoRA (VAE latents, a prompt per class, only LoRA
parameters featurized) the second (diffattr.latent). tests/test_model_kind.py runs every stage with a
test-only class-conditional v-prediction kind.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from .protocol import ARTIFACTS

DROPPED = -1  # the class label of an image whose caption is dropped (caption dropout, the unconditional branch)


class DiffusionModel:
    scheduler: DDPMScheduler
    weights_file = ARTIFACTS["weights"]  # the file a model's provenance hashes (model_sha256)
    artifact_files: tuple[str, ...]  # every file `save` writes into a model folder, weights_file among them
    num_classes: int | None = None  # classes `conditioning` tells apart; None: the kind ignores labels
    # True: a split's store holds the samples of the diffusion space (VAE latents, made by the `encode` rule)
    # and `encode` is the identity; False: it holds images, which `encode` maps
    stores_latents = False
    # The blocks of the `model:` config that the kind passes to a library class as keyword arguments
    # (block name -> class). The config check (diffattr.settings.library_block_faults) holds each block
    # to its class's signature and builds it on the meta device, before any job runs.
    config_blocks: dict[str, type] = {}
    config_keys: tuple[str, ...] = ()  # the kind's other keys of the `model:` block (typed by the schema)

    @classmethod
    def block_arguments(cls, block: str, spec: dict | None) -> dict:
        """The keyword arguments the kind passes to `config_blocks[block]` for the config's `spec`
        (None when the block is absent)."""
        return dict(spec or {})

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """A split store's samples (B, ...) -> their clean samples x0 in the space where diffusion runs:
        images (B, C, H, W) in [-1, 1] mapped, or, for a kind that `stores_latents`, the samples themselves."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> x0 in the diffusion space, whatever a split's store holds
        (`encode` itself for a kind that stores images)."""
        return self.encode(images)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode`: samples of the diffusion space -> images (unclamped)."""
        raise NotImplementedError

    def conditioning(self, labels: torch.Tensor | None):
        """What the network takes for the class labels (B,) of a batch (None for an unconditional kind)."""
        raise NotImplementedError

    def unconditional(self, n: int):
        """The conditioning of n images without their class (classifier-free guidance's other branch)."""
        raise ValueError(f"{type(self).__name__}: no unconditional branch, so generate.guidance_scale must be 1")

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample in the space where diffusion runs (pixels here, VAE latents for SD)."""
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The network's output at (x_t, t): eps_theta or v_theta, as `target`."""
        raise NotImplementedError

    def predict_with(self, params: dict, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """`predict` with the featurized parameters replaced by `params` (name -> tensor), for torch.func."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What `predict` is trained towards at x_t = add_noise(x0, eps, t): eps itself (epsilon
        prediction) or the velocity sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v_prediction)."""
        prediction = self.scheduler.config.prediction_type
        if prediction == "epsilon":
            return eps
        if prediction == "v_prediction":
            return self.scheduler.get_velocity(x0, eps, t)
        raise ValueError(f"prediction_type: '{prediction}' is not supported (expected epsilon or v_prediction)")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The network's parameters that require gradients (a frozen base's adapters, say)."""
        return [p for p in self.network().parameters() if p.requires_grad]

    def featurized_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name in `network()`, parameter) of what the featurizer differentiates: the trainable ones."""
        return [(name, p) for name, p in self.network().named_parameters() if p.requires_grad]

    def network(self) -> torch.nn.Module:
        """The module that `predict` calls and that holds the featurized parameters (the featurizer hooks
        its layers)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "DiffusionModel":
        raise NotImplementedError

    def to(self, device: torch.device) -> "DiffusionModel":
        """Move the model (and whatever it needs beside its weights) to `device`."""
        raise NotImplementedError

    def for_per_sample_gradients(self) -> "DiffusionModel":
        """Make `predict_with` safe under torch.func.vmap (same values, batched per sample)."""
        raise NotImplementedError

    def save(self, directory) -> None:
        raise NotImplementedError


# The protocol's DDPM: linear betas 1e-4..0.02, T = 1000, epsilon prediction (by default).
PROTOCOL_DDPM = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                 "beta_schedule": "linear", "prediction_type": "epsilon"}


def ddpm_scheduler(spec: dict | None = None) -> DDPMScheduler:
    """The protocol's DDPM (PROTOCOL_DDPM), with the keys of `spec` in place of its own."""
    return DDPMScheduler(**{**PROTOCOL_DDPM, **(spec or {})})


class PixelDDPM(DiffusionModel):
    """A diffusers UNet2DModel on pixels, unconditional; every UNet parameter is featurized."""

    artifact_files = (ARTIFACTS["weights"], "config.json", "scheduler_config.json")
    config_blocks = {"unet": UNet2DModel, "scheduler": DDPMScheduler}

    @classmethod
    def block_arguments(cls, block, spec):
        return {**PROTOCOL_DDPM, **(spec or {})} if block == "scheduler" else dict(spec or {})

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler):
        self.unet = unet
        self.scheduler = scheduler

    @classmethod
    def build(cls, spec: dict, seed: int) -> "PixelDDPM":
        torch.manual_seed(seed)  # the initial weights are a function of the training seed
        return cls(UNet2DModel(**spec["unet"]), ddpm_scheduler(spec.get("scheduler")))

    @classmethod
    def load(cls, directory, spec: dict | None = None) -> "PixelDDPM":
        directory = Path(directory)
        unet = UNet2DModel.from_pretrained(directory, use_safetensors=True)
        return cls(unet, DDPMScheduler.from_pretrained(directory))

    def save(self, directory) -> None:
        self.unet.save_pretrained(directory, safe_serialization=True)
        self.scheduler.save_pretrained(directory)

    def encode(self, images):
        return images

    def decode(self, x0):
        return x0

    def conditioning(self, labels):
        return None

    def latent_shape(self):
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def predict(self, x_t, t, cond=None):
        return self.unet(x_t, t.to(x_t.device)).sample

    def predict_with(self, params, x_t, t, cond=None):
        return torch.func.functional_call(self.unet, params, (x_t, t.to(x_t.device))).sample

    def network(self):
        return self.unet

    def train(self, mode=True):
        self.unet.train(mode)
        return self

    def to(self, device):
        self.unet.to(device)
        return self

    def for_per_sample_gradients(self):
        # Fused scaled-dot-product attention has no vmap batching rule (torch falls back to a slow
        # per-sample loop); diffusers' plain processor is matmuls and a softmax, which vmap batches.
        for module in self.unet.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())
        return self


KINDS = {"pixel_ddpm": PixelDDPM}  # and "latent_lora": diffattr.latent's LatentLoRA, which registers itself

# a module import, after KINDS: when diffattr.latent is imported first it is half-run here, which a
# module import allows and a name import of LatentLoRA would not
from . import latent  # noqa: E402,F401


def model_class(spec: dict) -> type[DiffusionModel]:
    kind = spec.get("kind", "pixel_ddpm")
    if kind not in KINDS:
        raise ValueError(f"model.kind: unknown kind '{kind}' (expected one of {', '.join(KINDS)})")
    return KINDS[kind]


def build_model(spec: dict, seed: int) -> DiffusionModel:
    return model_class(spec).build(spec, seed)


def load_model(spec: dict, directory) -> DiffusionModel:
    return model_class(spec).load(directory, spec)
