"""The protocol's vocabulary: model-output functions, timestep selections, the lambda grid, and the
names that the workflow's paths carry (feature sets, LDS models). Each name is formatted and parsed
here and nowhere else; `diffattr.plan` enumerates them from an experiment's settings."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

FUNCTIONS = ("simple", "elbo", "square", "avg", "l1", "l2", "linf")
FUNCTION_EXPECTED = (f"one of {', '.join(FUNCTIONS)} or interp<eta> with eta in [0, 1] "
                     "(e.g. interp0.25)")
_INTERP = re.compile(r"^interp(\d*\.?\d+)$")
SCHEMES = ("uniform", "cumulative")
# The ground truth's model-output function in the protocol (L_Simple): its stores and LDS tables keep
# their usual paths; another one (an ablation's gt_function) gets its own (diffattr.plan.truth_root).
DEFAULT_GT_FUNCTION = "simple"


def parse_function(name: str) -> tuple[str, float | None]:
    """'square' -> ('square', None); 'interp0.25' -> ('interp', 0.25)."""
    if name in FUNCTIONS:
        return name, None
    match = _INTERP.match(name)
    if match and 0.0 <= float(match.group(1)) <= 1.0:
        return "interp", float(match.group(1))
    raise ValueError(f"unknown model-output function '{name}': expected {FUNCTION_EXPECTED}")


def select_timesteps(count: int, scheme: str, num_train_timesteps: int = 1000) -> list[int]:
    """The protocol's selections of `count` (K) timesteps: uniform range(0, T, T // K) or cumulative
    range(K)."""
    if not 1 <= count <= num_train_timesteps:
        raise ValueError(f"number of timesteps K={count} must be in [1, {num_train_timesteps}]")
    if scheme == "uniform":
        return list(range(0, num_train_timesteps, num_train_timesteps // count))[:count]
    if scheme == "cumulative":
        return list(range(count))
    raise ValueError(f"timestep scheme '{scheme}': expected 'uniform' or 'cumulative'")


def ground_truth_timesteps(spec: dict, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps a ground-truth spec averages over (`ground_truth.timesteps` of them): the
    protocol's uniform range(0, T, T // K), or `scheme: stratified`, one random timestep per stratum
    (`stratified_timesteps`, seed `timestep_seed`), the same for every model and query."""
    count = int(spec["timesteps"])
    if spec.get("scheme", "uniform") == "stratified":
        return stratified_timesteps(count, num_train_timesteps, int(spec.get("timestep_seed", 0)))
    return select_timesteps(count, "uniform", num_train_timesteps)


def stratified_timesteps(count: int, num_train_timesteps: int = 1000, seed: int = 0) -> list[int]:
    """One timestep drawn uniformly in each of `count` equal strata of [0, T) (numpy generator `seed`):
    an unbiased estimate of the mean over all T timesteps, with less variance than `count` independent
    draws; the same timesteps for every model and query (common random numbers)."""
    if not 1 <= count <= num_train_timesteps:
        raise ValueError(f"number of timesteps K={count} must be in [1, {num_train_timesteps}]")
    edges = [j * num_train_timesteps // count for j in range(count + 1)]
    rng = np.random.default_rng(seed)
    return [int(low + rng.integers(high - low)) for low, high in zip(edges[:-1], edges[1:])]


def lambda_grid(exponents=(-2, 6), mantissas=(1, 2, 5)) -> list[float]:
    """Ascending grid mantissa x 10^e for e from exponents[0] to exponents[1] (score.lambda_exponents):
    0.01, 0.02, 0.05, ..., 5e6 by default.

    Values are parsed from text, so 3 x 10^-1 gives exactly the float 0.3 (3 * 10.0**-1 does not).
    """
    low, high = (int(e) for e in exponents)
    return sorted(float(f"{m}e{e}") for e in range(low, high + 1) for m in mantissas)


# A feature-set name: `{function}_K{K}_k{k}`, then each tag only where it differs from the default, in
# this order: `_cumulative` (timestep scheme; default uniform), `_e{N}` (noises per timestep; default 1),
# `_step{S}` (the features of the full model's kept training checkpoint at step S; default the final
# weights).
_FEATURE_SET = re.compile(r"(?P<function>[a-z0-9.]+)_K(?P<K>\d+)_k(?P<k>\d+)(?P<cumulative>_cumulative)?"
                          r"(?:_e(?P<noises>\d+))?(?:_step(?P<step>\d+))?")
# The same names as Snakemake wildcard constraints (which must not hold named groups of their own):
# FEATURE_SET for the final weights' sets, FEATURE_SET_ANY for those of kept checkpoints too.
FEATURE_SET_ANY = re.sub(r"\(\?P<\w+>", "(?:", _FEATURE_SET.pattern)
FEATURE_SET = FEATURE_SET_ANY.removesuffix(r"(?:_step(?:\d+))?")


@dataclass(frozen=True)
class FeatureSet:
    """One feature store's settings: model-output function, number of timesteps (K), projection
    dimension (k), timestep scheme, noises per timestep and training step of the weights (None: the
    final ones). `name` and `parse` are each other's inverse."""
    function: str
    n_timesteps: int
    proj_dim: int
    scheme: str = "uniform"
    noises: int = 1
    step: int | None = None

    def __post_init__(self):
        parse_function(self.function)
        if self.scheme not in SCHEMES:
            raise ValueError(f"timestep scheme {self.scheme!r}: expected one of {', '.join(SCHEMES)}")
        for key in ("n_timesteps", "proj_dim", "noises"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"feature set {key}: got {getattr(self, key)!r}; expected an integer >= 1")
        if self.step is not None and (not isinstance(self.step, int) or self.step < 0):
            raise ValueError(f"feature set step: got {self.step!r}; expected an integer >= 0 or None")

    @property
    def stem(self) -> str:
        """`{function}_K{K}_k{k}`: the name without tags."""
        return f"{self.function}_K{self.n_timesteps}_k{self.proj_dim}"

    @property
    def name(self) -> str:
        return (self.stem + ("_cumulative" if self.scheme == "cumulative" else "")
                + (f"_e{self.noises}" if self.noises != 1 else "") + ("" if self.step is None else f"_step{self.step}"))

    @property
    def tags(self) -> str:
        """The name's tags without the leading '_' ('' for the defaults, 'cumulative_e2', ...)."""
        return self.name[len(self.stem) + 1:]

    def at_step(self, step: int | None) -> "FeatureSet":
        """The same set computed from the weights of training step `step` (None: the final ones)."""
        return FeatureSet(self.function, self.n_timesteps, self.proj_dim, self.scheme, self.noises, step)

    def timesteps(self, num_train_timesteps: int = 1000) -> list[int]:
        return select_timesteps(self.n_timesteps, self.scheme, num_train_timesteps)

    @classmethod
    def parse(cls, name: str) -> "FeatureSet":
        """The feature set named `name`; refused unless `name` is exactly its canonical name."""
        match = _FEATURE_SET.fullmatch(name)
        try:
            fset = match and cls(match["function"], int(match["K"]), int(match["k"]),
                                 "cumulative" if match["cumulative"] else "uniform",
                                 int(match["noises"] or 1), None if match["step"] is None else int(match["step"]))
        except ValueError:
            fset = None
        if not fset or fset.name != name:
            raise ValueError(f"feature set name {name!r}: expected {{function}}_K{{K}}_k{{k}}, then "
                             "_cumulative for cumulative timesteps, _e{N} for N > 1 noises per timestep and "
                             "_step{S} for a kept training checkpoint's weights, in this order "
                             "(e.g. square_K10_k512_cumulative_e2 or square_K10_k512_step100)")
        return fset


# An influence-function store (diffattr.kfac): influence_<f>_K<K>, then _k<k> when projected.
_INFLUENCE_STORE = re.compile(r"influence_(?P<function>[a-z0-9.]+)_K(?P<K>\d+)(?:_k(?P<k>\d+))?")
INFLUENCE_STORE = re.sub(r"\(\?P<\w+>", "(?:", _INFLUENCE_STORE.pattern)


def influence_store(function: str, K: int, proj_dim: int | None = None) -> str:
    return f"influence_{function}_K{int(K)}" + ("" if proj_dim is None else f"_k{int(proj_dim)}")


def parse_influence_store(name: str) -> tuple[str, int, int | None]:
    """(function, K, proj_dim or None) of an influence store's name."""
    match = _INFLUENCE_STORE.fullmatch(name)
    if not match:
        raise ValueError(f"influence store name {name!r}: expected influence_{{function}}_K{{K}}[_k{{k}}]")
    return match["function"], int(match["K"]), None if match["k"] is None else int(match["k"])


# The files of a trained model's folder that the workflow's rules name, the same for every model kind
# (rules name them before they know an experiment's kind): the weights the kind trains (every kind
# saves them under this name), the trainer's loss log and its training record (diffattr.train).
# The model kinds (diffattr.models.KINDS) that diffuse in a VAE's latent space: their splits are encoded
# once by their own job, and their models read the latents (diffattr.plan.Plan.samples).
LATENT_KINDS = ("latent_lora",)
# train's opt-in speed options (diffattr.train): booleans, off when absent; one set to false is the
# training without it, in its identity and its rule params (rules/train.smk), so adding the keys
# reruns no finished training
TRAIN_SPEED_OPTIONS = ("channels_last", "compile")


def without_unset_speed_options(train: dict) -> dict:
    """`train` without the speed options set to false: a training with one off is the training without it."""
    return {key: value for key, value in train.items() if not (key in TRAIN_SPEED_OPTIONS and value is False)}

# The protocol's arithmetic, a stage's `dtype` when absent (train, ground_truth, generate, featurize,
# the counterfactual's regeneration and losses): strict fp32 (diffattr.device.precision).
DEFAULT_DTYPE = "fp32"


def stage_dtype(spec: dict) -> str:
    """A stage's `dtype` setting, DEFAULT_DTYPE when absent."""
    return spec.get("dtype", DEFAULT_DTYPE)


# featurize.dtype: the arithmetic of the gradients for features (diffattr.featurize, journey, kfac's
# influence features). No schema default: absent is fp32, the protocol's; a store records it as
# `arithmetic` (a store written before the key records none: fp32), and a job's rule params hold it only
# when it is not fp32, so that adding the key to the schema or a config reruns no finished job.
FEATURIZE_DTYPES = ("fp32", "tf32")
FEATURIZE_PARAM_KEYS = ("proj_seed", "projector", "noise_seed", "batch_size")


def featurize_arithmetic(featurize: dict) -> str:
    """featurize.dtype (fp32 when absent), refused unless one of FEATURIZE_DTYPES."""
    dtype = stage_dtype(featurize)
    if dtype not in FEATURIZE_DTYPES:
        raise ValueError(f"featurize.dtype: got {dtype!r}; expected one of {', '.join(FEATURIZE_DTYPES)} "
                         "(no bf16 / fp16 for gradients)")
    return dtype


# The factorized projection's `norm` split (featurize.factor_split) gives each layer a share of k that
# follows its per-sample gradient norm, measured on the first `images` train images at `timesteps`
# uniform timesteps, in chunks of `chunk`: fixed numbers, so that every job of a feature set (train,
# queries, Journey-TRAK) measures the same split whatever its K or featurize.batch_size.
CALIBRATION = {"images": 32, "timesteps": 10, "chunk": 8}


def projector_kind(featurize: dict) -> str:
    """featurize.projector: normal (the paper's dense projection) when absent, or factorized."""
    return featurize.get("projector", "normal")


def factor_split(featurize: dict) -> str | None:
    """How a factorized projection splits k (featurize.factor_split, norm when absent); None for the
    dense projection, which has no split."""
    return featurize.get("factor_split", "norm") if projector_kind(featurize) == "factorized" else None


def featurize_params(featurize: dict) -> dict:
    """The featurize settings every feature store's job is a function of (its rule params): the seeds,
    the projector and the batch size where set (`projector` absent: the default projection, whose stores
    keep their params), a factorized projection's `factor_split`, and `dtype` only when it is not fp32."""
    params = {key: featurize[key] for key in FEATURIZE_PARAM_KEYS if key in featurize}
    if split := factor_split(featurize):
        params["factor_split"] = split
    if (dtype := featurize_arithmetic(featurize)) != "fp32":
        params["dtype"] = dtype
    return params

ARTIFACTS = {"weights": "diffusion_pytorch_model.safetensors", "loss_log": "train_log.csv",
             "training": "training.json"}

# An LDS or retraining-pool model's name: subset j (three digits at least) and training seed r.
MODEL_NAME = r"s\d\d\d+-r\d+"
_MODEL_NAME = re.compile(r"s(?P<subset>\d{3,})-r(?P<seed>\d+)")


@dataclass(frozen=True)
class ModelName:
    """A model trained on subset `subset` with training seed `seed`: `s003-r1`."""
    subset: int
    seed: int

    @property
    def name(self) -> str:
        return f"s{self.subset:03d}-r{self.seed}"

    @classmethod
    def parse(cls, name: str) -> "ModelName":
        match = _MODEL_NAME.fullmatch(name)
        if not match or cls(int(match["subset"]), int(match["seed"])).name != name:
            raise ValueError(f"model name {name!r}: expected s<subset, 3 digits at least>-r<training seed>, "
                             "e.g. s003-r1")
        return cls(int(match["subset"]), int(match["seed"]))
