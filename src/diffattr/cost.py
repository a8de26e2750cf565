"""What an experiment costs on a device: its plan's jobs (`Plan.jobs`) times the work of each job, in
units a stage harness measures (`benchmarks/stage_throughput.py`), divided by the throughput of
each unit on that device. The work of a job is read from its output path and the settings, so the
cost follows the plan: a rule the plan gains shows up here, as unmodelled until its work is named.

Units (what one unit is):
- `train_step_<dtype>`: one optimizer step at the preset's `train.batch_size` in its `train.dtype`;
  `train_step_<dtype>_cl` / `_compiled`: the same with train.channels_last / train.compile (`train_unit`);
- `compilation`: torch.compile's work for one training job (train.compile) from an empty inductor
  cache, its warm-up steps paying it (about 90 s for cifar2's UNet on an H200);
  `compilation_cached`: the same for a job that finds an earlier job's graphs and kernels in the cache
  the jobs share (config.yaml's `compile_cache`): Dynamo's tracing and the loading only. With a shared
  cache the first compiled job of each training unit pays `compilation`, every later one
  `compilation_cached` (`Work(shared_cache=False)`: each pays `compilation`);
- `eval_<dtype>`: one UNet forward pass of one noised image in that precision (ground truth; DAS's
  residuals, fp32);
- `gradient`: the per-sample gradient of one noised copy in fp32 (featurization: samples x K x noises;
  K-FAC's curvature passes, always fp32); `gradient_tf32`: the same in TF32 (featurize.dtype tf32: the
  featurize, Journey-TRAK and influence-feature jobs' gradients);
- `projection`: one gradient row projected to one output dimension (rows x k; a dense projection's
  cost is linear in k, as fast_jl's and our `BlockProjector`'s are);
- `factorized`, `factorized_tf32`: one noised copy's gradient projected by the factorized projector
  (featurize.projector factorized), in fp32 or TF32, in place of its `gradient` and `projection`: its
  cost is the backward pass's and grows only slowly with k, so the rate measured at the preset's
  largest k prices every k of it (an upper bound for the smaller ones); its `norm` split adds the
  `gradient`s of its measurement (protocol.CALIBRATION) to each job;
- `ddim_step_<dtype>`: one image through one sampler step (generation; Journey-TRAK's trajectories);
a latent kind's (LATENT_UNITS, which stage_throughput does not measure yet):
- `vae_encode`, `vae_decode`: one image through the VAE's encoder (a split's latents, once each) or
  decoder (the generation set's images);
- `base_vae_step`, `base_unet_step`: one optimizer step of the embedded base's VAE or UNet at its own
  batch size (model.base.vae_train, model.base.unet_train; only when model.pretrained is null).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .plan import PATHS, Plan
from .protocol import (CALIBRATION, FeatureSet, factor_split, featurize_arithmetic, parse_influence_store,
                       projector_kind, stage_dtype)

LATENT_UNITS = ("vae_encode", "vae_decode", "base_vae_step", "base_unet_step")
# train's speed options (protocol.TRAIN_SPEED_OPTIONS) as a training unit's suffix; not both together
TRAIN_OPTION_SUFFIXES = {"channels_last": "_cl", "compile": "_compiled"}
TRAIN_UNITS = tuple(f"train_step_{dtype}{suffix}" for dtype in ("fp32", "tf32", "bf16", "fp16")
                    for suffix in ("", *TRAIN_OPTION_SUFFIXES.values()))
UNITS = (*TRAIN_UNITS, "compilation", "compilation_cached", "eval_fp32", "eval_tf32", "eval_bf16", "gradient",
         "gradient_tf32", "projection", "factorized", "factorized_tf32", "ddim_step_fp32", "ddim_step_tf32",
         "ddim_step_bf16", *LATENT_UNITS)
# Rules whose jobs run on the host (CPU): ridge solves, Spearman, tables, figures, CLIP embeddings of small images.
HOST_RULES = frozenset({"download_cifar10", "dataset", "subsets", "retrain_subsets", "embed_clip", "score",
                        "tracin", "baseline", "score_ensemble", "retrain_score", "lds", "lds_other_truth",
                        "ablation", "table", "figure", "influence_score"})


def train_unit(train: dict) -> str:
    """The unit of one step of a training with settings `train`: its dtype and speed options."""
    suffix = "".join(tag for key, tag in TRAIN_OPTION_SUFFIXES.items() if train.get(key))
    return f"train_step_{stage_dtype(train)}{suffix}"


# What a {field} matches: one path component, but a {root} holds several and a ground truth's
# {model} may be a pool model's retrain/<name> (rules/ground_truth.smk).
FIELD_PATTERNS = {"root": ".+", "model": "(?:retrain/)?[^/]+"}


def _matcher(template: str) -> re.Pattern:
    """A regex with one named group per {field} of a PATHS template."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{FIELD_PATTERNS.get(p, '[^/]+')})"
                              for i, p in enumerate(parts)) + "$")


def fields(kind: str, product: str) -> dict[str, str]:
    """The {field} values of a product path of PATHS[kind]: `path`'s inverse."""
    found = _matcher(PATHS[kind]).match(product)
    if found is None:
        raise ValueError(f"{product!r} is not a {kind} path ({PATHS[kind]})")
    return found.groupdict()


class Work:
    """The work of each job of a plan, in UNITS. With `shared_cache`, compiled trainings find the first
    one's compilation in the cache: `job` then prices the first training job it is asked about of each
    training unit with `compilation`, the later ones with `compilation_cached`."""

    def __init__(self, plan: Plan, shared_cache: bool = True):
        self.plan, self.settings = plan, plan.settings
        self.shared_cache = shared_cache
        self._compiled_units: set[str] = set()  # training units whose compilation is in the cache

    def count(self, split: str) -> int:
        """Images of a split: the dataset's train / val, or the generation set."""
        if split == "gen":
            return int(self.settings["generate"]["n"])
        return int(self.settings["dataset"]["n_train" if split == "train" else "n_val"])

    def queries(self) -> int:
        return self.count("val") + self.count("gen")

    def sampling(self) -> str:
        return f"ddim_step_{stage_dtype(self.settings['generate'])}"

    def gradient(self) -> str:
        """The unit of a feature's gradient: `gradient` (fp32, the stored unit's name) or gradient_tf32."""
        dtype = featurize_arithmetic(self.settings["featurize"])
        return "gradient" if dtype == "fp32" else f"gradient_{dtype}"

    def projected_gradients(self, copies: int, rows: int, k: int) -> Counter:
        """`copies` noised copies' gradients summed into `rows` feature rows of k dimensions, by the
        featurize settings' projector: the dense one projects each row, the factorized one each copy."""
        featurize = self.settings["featurize"]
        if projector_kind(featurize) == "factorized":
            work = Counter({self.gradient().replace("gradient", "factorized"): copies})
            if factor_split(featurize) == "norm":  # its measurement: full gradients of a few train images
                work[self.gradient()] += min(self.count("train"), CALIBRATION["images"]) * CALIBRATION["timesteps"]
            return work
        return Counter({self.gradient(): copies, "projection": rows * k})

    def featurization(self, fset: FeatureSet, split: str) -> Counter:
        n = self.count(split)
        return self.projected_gradients(n * fset.n_timesteps * fset.noises, n, fset.proj_dim)

    def job(self, rule: str, output: str) -> Counter | None:
        """The work of the job of `rule` with first output `output`; None for a host rule, and for
        a rule whose work is not modelled (KeyError)."""
        s = self.settings
        if rule in HOST_RULES:
            return None
        if rule in ("train_full", "train_lds", "train_retrain"):
            steps, unit = s["train"]["full_steps" if rule == "train_full" else "lds_steps"], train_unit(s["train"])
            return Counter({unit: int(steps), **self._compilation(unit)})
        if rule in ("ground_truth", "ground_truth_other_function"):
            pool = "/ground_truth/retrain/" in output  # a pool model's outputs (rules/ground_truth.smk)
            spec = self.plan.retrain if pool else s["ground_truth"]
            evals = self.queries() * int(spec["timesteps"]) * len(spec["noise_seeds"])
            return Counter({f"eval_{s['ground_truth']['dtype']}": evals})
        if rule in ("encode", "encode_flipped"):
            kind = "latents_flipped" if rule == "encode_flipped" else "latents"
            return Counter(vae_encode=self.count(fields(kind, output)["split"]))
        if rule == "decode_generated":
            return Counter(vae_decode=self.count("gen"))
        if rule == "base":
            base = s["model"]["base"]
            return Counter(base_vae_step=int(base["vae_train"]["steps"]), base_unet_step=int(base["unet_train"]["steps"]))
        if rule == "generate":
            return Counter({self.sampling(): self.count("gen") * int(s["generate"]["steps"])})
        if rule in ("featurize", "featurize_retrained"):
            kind = "features" if rule == "featurize" else "pool_features"
            found = fields(kind, output)
            return self.featurization(FeatureSet.parse(found["fset"]), found["split"])
        if rule == "featurize_journey":
            found = fields("journey", output)
            steps, n = int(s["generate"]["steps"]), self.count("gen")
            return Counter({self.sampling(): n * steps, **self.projected_gradients(n * steps, n, int(found["k"]))})
        if rule == "residual":
            fset = FeatureSet.parse(fields("residual", output)["fset"])
            return Counter(eval_fp32=self.count("train") * fset.n_timesteps * fset.noises)
        if rule == "curvature":  # K-FAC's and EK-FAC's passes: a gradient per draw each (one Monte-Carlo vector)
            return Counter(gradient=2 * int(self.plan.influence["samples"]) * self.count("train"))
        if rule == "influence_features":  # gradients, then 2 variants x the dampings projected (when projected)
            found = fields("influence_features", output)
            _, K, k = parse_influence_store(found["istore"])
            rows = self.count(found["split"])
            projected = {} if k is None else {"projection": rows * k * 2 * len(self.plan.influence["dampings"])}
            return Counter({self.gradient(): rows * K, **projected})
        raise KeyError(rule)

    def _compilation(self, unit: str) -> dict[str, int]:
        if not self.settings["train"].get("compile"):
            return {}
        cached = self.shared_cache and unit in self._compiled_units
        self._compiled_units.add(unit)
        return {"compilation_cached" if cached else "compilation": 1}


@dataclass
class RuleCost:
    rule: str
    jobs: int
    work: Counter | None        # summed over the jobs; None: a host rule or not modelled
    modelled: bool
    seconds: float | None = None


def plan_cost(plan: Plan, throughputs: dict[str, float], shared_cache: bool = True) -> list[RuleCost]:
    """Per rule of the plan: its jobs, their summed work and the device seconds at `throughputs`
    (units/s; a unit missing there leaves the rule's seconds None). `shared_cache`: see Work."""
    work, rows = Work(plan, shared_cache), []
    for rule, outputs in plan.jobs().items():
        try:
            per_job = [work.job(rule, output) for output in outputs]
        except KeyError:
            rows.append(RuleCost(rule, len(outputs), None, modelled=False))
            continue
        if per_job[0] is None:
            rows.append(RuleCost(rule, len(outputs), None, modelled=True))
            continue
        total = sum(per_job, Counter())
        seconds = (sum(amount / throughputs[unit] for unit, amount in total.items())
                   if all(unit in throughputs for unit in total) else None)
        rows.append(RuleCost(rule, len(outputs), total, modelled=True, seconds=seconds))
    return rows
