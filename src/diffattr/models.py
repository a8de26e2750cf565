"""The model layer: what the trainer, generator, ground truth and featurizer need of a diffusion model.

Every stage talks to a `DiffusionModel`: latents of images, class conditioning, the epsilon
prediction, and the parameters to featurize. The pixel-space DDPM below is the first kind; a latent
Stable Diffusion with LoRA (VAE latents, a prompt per class, only LoRA parameters featurized)
is meant to be a second subclass registered in `KINDS`, leaving the stages untouched.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor


# A trained model's folder, the same for every kind (the workflow's rules name these files before they
# know an experiment's kind): the weights the kind trains, its network's config, the trainer's loss log
# and training record (diffattr.train).
ARTIFACTS = {"weights": "diffusion_pytorch_model.safetensors", "config": "config.json",
             "loss_log": "train_log.csv", "training": "training.json"}


class DiffusionModel:
    scheduler: DDPMScheduler
    weights_file = ARTIFACTS["weights"]

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def conditioning(self, labels: torch.Tensor | None):
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample in the space where diffusion runs (pixels here, VAE latents for SD)."""
        raise NotImplementedError

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        raise NotImplementedError

    def eps_with(self, params: dict, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """`eps` with the featurized parameters replaced by `params` (name -> tensor), for torch.func."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def featurized_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError

    def network(self) -> torch.nn.Module:
        """The module that `eps` calls and that holds the featurized parameters (the featurizer hooks
        its layers)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "DiffusionModel":
        raise NotImplementedError

    def to(self, device: torch.device) -> "DiffusionModel":
        """Move the model (and whatever it needs beside its weights) to `device`."""
        raise NotImplementedError

    def for_per_sample_gradients(self) -> "DiffusionModel":
        """Make `eps_with` safe under torch.func.vmap (same values, batched per sample)."""
        raise NotImplementedError

    def save(self, directory) -> None:
        raise NotImplementedError


def ddpm_scheduler(spec: dict | None = None) -> DDPMScheduler:
    """The protocol's DDPM: linear betas 1e-4..0.02, T = 1000, epsilon prediction."""
    spec = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
            "beta_schedule": "linear", "prediction_type": "epsilon", **(spec or {})}
    return DDPMScheduler(**spec)


class PixelDDPM(DiffusionModel):
    """A diffusers UNet2DModel on pixels; every UNet parameter is featurized."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler):
        self.unet = unet
        self.scheduler = scheduler

    @classmethod
    def build(cls, spec: dict, seed: int) -> "PixelDDPM":
        torch.manual_seed(seed)  # the initial weights are a function of the training seed
        return cls(UNet2DModel(**spec["unet"]), ddpm_scheduler(spec.get("scheduler")))

    @classmethod
    def load(cls, directory) -> "PixelDDPM":
        directory = Path(directory)
        unet = UNet2DModel.from_pretrained(directory, use_safetensors=True)
        return cls(unet, DDPMScheduler.from_pretrained(directory))

    def save(self, directory) -> None:
        self.unet.save_pretrained(directory, safe_serialization=True)
        self.scheduler.save_pretrained(directory)

    def latents(self, images):
        return images

    def conditioning(self, labels):
        return None

    def latent_shape(self):
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def eps(self, x_t, t, cond=None):
        return self.unet(x_t, t.to(x_t.device)).sample

    def eps_with(self, params, x_t, t, cond=None):
        return torch.func.functional_call(self.unet, params, (x_t, t.to(x_t.device))).sample

    def trainable_parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    def featurized_parameters(self):
        return [(name, p) for name, p in self.unet.named_parameters() if p.requires_grad]

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


KINDS = {"pixel_ddpm": PixelDDPM}


def model_class(spec: dict) -> type[DiffusionModel]:
    kind = spec.get("kind", "pixel_ddpm")
    if kind not in KINDS:
        raise ValueError(f"model.kind: unknown kind '{kind}' (expected one of {', '.join(KINDS)})")
    return KINDS[kind]


def build_model(spec: dict, seed: int) -> DiffusionModel:
    return model_class(spec).build(spec, seed)


def load_model(spec: dict, directory) -> DiffusionModel:
    return model_class(spec).load(directory)
