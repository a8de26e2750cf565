"""Config validation: every malformed config gives one line naming the key, the value and what was
expected, before any job runs; the shipped presets and `--config` overrides pass."""
import copy
import subprocess
import sys

import pytest
import torch
import yaml

from diffattr import library_blocks, messages
from diffattr import settings as cfg
from diffattr.settings import ConfigError, deep_merge, experiment, resolve_all, schema, validate_config

from dry_run import REPO, copy_workflow

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
PRESETS = ", ".join(CONFIG["experiments"])
WITHIN_T = "expected K at most T = 1000 (model.scheduler.num_train_timesteps)"


def edited(change: dict) -> dict:
    """config.yaml with `change` deep-merged in."""
    return deep_merge(CONFIG, change)


def tiny(**sections) -> dict:
    return {"experiments": {"tiny": sections}}


# (id, change to config.yaml, the exact message)
MALFORMED = [
    ("alpha above 1", tiny(subsets={"alpha": 1.5}),
     "experiments.tiny.subsets.alpha: got 1.5; expected a number in (0, 1)"),
    ("alpha at 0", tiny(subsets={"alpha": 0}),
     "experiments.tiny.subsets.alpha: got 0; expected a number in (0, 1)"),
    ("wrong type", {"experiments": {"default": {"train": {"batch_size": "big"}}}},
     'experiments.default.train.batch_size: got "big"; expected an integer >= 1'),
    ("bool for an integer", tiny(subsets={"m": True}),
     "experiments.tiny.subsets.m: got true; expected an integer >= 2"),
    ("negative step count", tiny(train={"lds_steps": -5}),
     "experiments.tiny.train.lds_steps: got -5; expected an integer >= 1"),
    ("zero generation steps", tiny(generate={"steps": 0}),
     "experiments.tiny.generate.steps: got 0; expected an integer >= 1"),
    ("negative seed in a list", tiny(subsets={"train_seeds": [0, -1]}),
     "experiments.tiny.subsets.train_seeds[1]: got -1; expected an integer >= 0"),
    ("repeated seeds", tiny(ground_truth={"noise_seeds": [0, 0]}),
     "experiments.tiny.ground_truth.noise_seeds: got [0, 0]; expected a non-empty list of "
     "(an integer >= 0) without repeats"),
    ("K larger than T", tiny(featurize={"timesteps": [4, 2000]}),
     f"experiments.tiny.featurize.timesteps[1]: got K = 2000; {WITHIN_T}"),
    ("K larger than the scheduler's T", tiny(model={"scheduler": {"num_train_timesteps": 100}},
                                             ground_truth={"timesteps": 10}, featurize={"timesteps": [200]}),
     "experiments.tiny.featurize.timesteps[0]: got K = 200; expected K at most T = 100 "
     "(model.scheduler.num_train_timesteps)"),
    ("ground-truth timesteps larger than T", tiny(ground_truth={"timesteps": 1001}),
     "experiments.tiny.ground_truth.timesteps: got 1001; expected at most T = 1000 "
     "(model.scheduler.num_train_timesteps)"),
    ("unknown function", tiny(featurize={"functions": ["simple", "sqaure"]}),
     'experiments.tiny.featurize.functions[1]: got "sqaure"; expected one of simple, elbo, square, avg, '
     "l1, l2, linf or interp<eta> with eta in [0, 1] (e.g. interp0.25)"),
    ("K beyond T in an extra grid",
     tiny(featurize={"extra_grids": [{"functions": ["avg"], "timesteps": [10, 1001], "proj_dims": [64]}]}),
     "experiments.tiny.featurize.extra_grids[0].timesteps[1]: got K = 1001; expected K at most T = 1000 "
     "(model.scheduler.num_train_timesteps)"),
    ("extra grid without dims", tiny(featurize={"extra_grids": [{"functions": ["avg"], "timesteps": [10]}]}),
     "experiments.tiny.featurize.extra_grids[0].proj_dims: got no value; expected a non-empty list of "
     "(an integer >= 1) without repeats"),
    ("interp beyond 1", tiny(featurize={"functions": ["interp1.5"]}),
     'experiments.tiny.featurize.functions[0]: got "interp1.5"; expected one of simple, elbo, square, '
     "avg, l1, l2, linf or interp<eta> with eta in [0, 1] (e.g. interp0.25)"),
    ("unknown scheme", tiny(featurize={"scheme": "linear"}),
     'experiments.tiny.featurize.scheme: got "linear"; expected a string matching ^(uniform|cumulative)$ '
     'or a non-empty list of (one of "uniform", "cumulative") without repeats'),
    ("unknown dtype", tiny(ground_truth={"dtype": "fp16"}),
     'experiments.tiny.ground_truth.dtype: got "fp16"; expected one of "fp32", "tf32", "bf16"'),
    ("bf16 gradients", tiny(featurize={"dtype": "bf16"}),
     'experiments.tiny.featurize.dtype: got "bf16"; expected one of "fp32", "tf32"'),
    ("unknown lambda rule", tiny(lds={"lambda_rules": ["oracle", "best"]}),
     'experiments.tiny.lds.lambda_rules[1]: got "best"; expected one of "oracle", "heldout"'),
    ("unknown source", tiny(dataset={"source": "mnist"}),
     'experiments.tiny.dataset.source: got "mnist"; expected one of "sklearn_digits", "cifar10", '
     '"celeba", "image_folder", "artbench"'),
    ("misspelt key", tiny(train={"ful_steps": 40}),
     "experiments.tiny.train.ful_steps: got 40; expected no such key (did you mean full_steps?): train "
     "takes batch_size, lr, betas, weight_decay, grad_clip, warmup_fraction, hflip, caption_dropout, dtype, "
     "channels_last, compile, full_steps, lds_steps, checkpoint_every, keep_checkpoints"),
    ("misspelt section", tiny(featurise={"batch_size": 8}),
     'experiments.tiny.featurise: got {"batch_size": 8}; expected no such key (did you mean featurize?): '
     "tiny takes dataset, model, train, subsets, generate, ground_truth, featurize, score, lds, influence, retrain, "
     "counterfactual, threads, ablations"),
    ("kept steps descending", tiny(train={"keep_checkpoints": [30, 20]}, featurize={"extra_grids": []}),
     "experiments.tiny.train.keep_checkpoints: got [30, 20]; expected steps in ascending order"),
    ("kept step beyond the training", tiny(train={"keep_checkpoints": [20, 41]}),
     "experiments.tiny.train.keep_checkpoints[1]: got 41; expected a step at most train.full_steps = 40"),
    ("grid checkpoint not kept", tiny(featurize={"extra_grids": [{"functions": ["avg"], "timesteps": [4],
                                                                  "proj_dims": [64], "checkpoints": [10]}]}),
     "experiments.tiny.featurize.extra_grids[0].checkpoints[0]: got 10; expected one of "
     "train.keep_checkpoints below train.full_steps = 40 ([20]); the final weights' features are the "
     "grid's own"),
    ("grid checkpoint at the final step", tiny(train={"keep_checkpoints": [20, 40]},
                                               featurize={"extra_grids": [{"functions": ["avg"], "timesteps": [4],
                                                                           "proj_dims": [64], "checkpoints": [40]}]}),
     "experiments.tiny.featurize.extra_grids[0].checkpoints[0]: got 40; expected one of "
     "train.keep_checkpoints below train.full_steps = 40 ([20]); the final weights' features are the "
     "grid's own"),
    ("unknown trajectory method", tiny(score={"trajectory_methods": ["tracin"]}),
     'experiments.tiny.score.trajectory_methods[0]: got "tracin"; expected one of "tracincp", "gas"'),
    ("betas of three", tiny(train={"betas": [0.9, 0.99, 0.999]}),
     "experiments.tiny.train.betas: got [0.9, 0.99, 0.999]; expected a list of 2 of (a number in [0, 1))"),
    ("lambda exponents reversed", tiny(score={"lambda_exponents": [6, -2]}),
     "experiments.tiny.score.lambda_exponents: got [6, -2]; expected [low, high] with low <= high"),
    ("heldout with 3 subsets", tiny(subsets={"m": 3}),
     "experiments.tiny.subsets.m: got 3; expected at least 4 for the heldout lambda rule (it selects on "
     "half of the subsets and reports on the other half)"),
    ("UNet size not the images'", tiny(model={"unet": {"sample_size": 16}}),
     "experiments.tiny.model.unet.sample_size: got 16; expected 8, the side of the dataset's images "
     "(dataset.image_size)"),
    ("RGB UNet on digits", tiny(model={"unet": {"in_channels": 3}}),
     "experiments.tiny.model.unet.in_channels: got 3; expected 1, the channels of sklearn_digits images"),
    ("block types per level", tiny(model={"unet": {"down_block_types": ["DownBlock2D"]}}),
     "experiments.tiny.model.unet.down_block_types: got 1 blocks; expected 2, one per entry of "
     "model.unet.block_out_channels"),
    ("GroupNorm groups", tiny(model={"unet": {"block_out_channels": [8, 12], "norm_num_groups": 8}}),
     "experiments.tiny.model.unet.norm_num_groups: got 8; expected a divisor of every entry of "
     "model.unet.block_out_channels [8, 12]"),
    ("pool subsets drawn with LDS seeds", tiny(retrain={"n_models": [4], "seed": 44}),
     "experiments.tiny.retrain.seed: got 44; expected a seed whose pool subsets (seeds 44 + 2j, j < 4) "
     "share none with the LDS subsets' (subsets.seed 42 + 2j, j < 8), e.g. 43; both draw seed 44"),
    ("too few retrained models", tiny(retrain={"n_models": [2]}),
     "experiments.tiny.retrain.n_models[0]: got 2; expected an integer in [3, 1000]"),
    ("unknown retraining method", tiny(retrain={"methods": ["loo"]}),
     'experiments.tiny.retrain.methods[0]: got "loo"; expected one of "empirical_if", "datamodel"'),
    ("outputs' timesteps beyond T", tiny(retrain={"n_models": [4], "timesteps": 1001}),
     "experiments.tiny.retrain.timesteps: got 1001; expected at most T = 1000 "
     "(model.scheduler.num_train_timesteps)"),
    ("ridge grid reversed", tiny(retrain={"datamodel_alpha_exponents": [3, -1]}),
     "experiments.tiny.retrain.datamodel_alpha_exponents: got [3, -1]; expected [low, high] with low <= high"),
    ("unknown preset", {"experiment": "tinny"},
     f'experiment: got "tinny"; expected one of the presets under experiments: {PRESETS}'),
    ("unknown base", tiny(base="defualt"),
     f'experiments.tiny.base: got "defualt"; expected one of the presets under experiments: {PRESETS}'),
    ("base cycle", {"experiments": {"default": {"base": "tiny"}}},
     'experiments.tiny.base: got "default"; expected a chain of bases that ends, not the cycle '
     "default -> tiny -> default"),
    ("incomplete preset", {"experiments": {"bare": {k: v for k, v in CONFIG["experiments"]["default"].items()
                                                    if k != "lds"}}},
     "experiments.bare.lds: got no value; expected a mapping"),
    ("top-level typo", {"experimnt": "tiny"},
     'experimnt: got "tiny"; expected no such key (did you mean experiment?): the top level takes '
     "experiment, cifar10_path, device, compile_cache, experiments"),
    ("channels_last not a boolean", tiny(train={"channels_last": "maybe"}),
     'experiments.tiny.train.channels_last: got "maybe"; expected true or false'),
    ("compile not a boolean", tiny(train={"compile": 1}),
     "experiments.tiny.train.compile: got 1; expected true or false"),
    ("compile with channels_last", tiny(train={"compile": True, "channels_last": True}),
     "experiments.tiny.train.compile: got true with train.channels_last true; expected at most one of the two: "
     "torch 2.13's inductor computed wrong gradients for the UNet's channels-last convolutions "
     "(tests/test_train_speed.py)"),
    ("unknown training dtype", tiny(train={"dtype": "fp8"}),
     'experiments.tiny.train.dtype: got "fp8"; expected one of "fp32", "tf32", "bf16", "fp16"'),
    ("fp16 generation", tiny(generate={"dtype": "fp16"}),
     'experiments.tiny.generate.dtype: got "fp16"; expected one of "fp32", "tf32", "bf16"'),
    ("fp16 training on the CPU", {"device": "cpu", "experiment": "tiny", **tiny(train={"dtype": "fp16"})},
     'experiments.tiny.train.dtype: got "fp16"; expected fp32, tf32 or bf16 on device cpu: fp16 training '
     "needs a CUDA GPU"),
    ("unknown device", {"device": "gpu"},
     'device: got "gpu"; expected a string matching ^(auto|cpu|cuda(:[0-9]+)?)$'),
    ("cifar10_path not a path", {"cifar10_path": 5},
     "cifar10_path: got 5; expected a string or null"),
    ("preset not a mapping", {"experiments": {"broken": 5}},
     "experiments.broken: got 5; expected a mapping"),
]


@pytest.mark.parametrize("change, message", [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_config_gives_one_line(change, message):
    with pytest.raises(ConfigError) as error:
        validate_config(edited(change))
    assert str(error.value) == message


def test_every_fault_is_listed_one_per_line():
    with pytest.raises(ConfigError) as error:
        resolve_all(edited(tiny(subsets={"alpha": 2}, train={"lr": -1})))
    assert str(error.value).splitlines() == [
        "experiments.tiny.subsets.alpha: got 2; expected a number in (0, 1)",
        "experiments.tiny.train.lr: got -1; expected a number > 0",
    ]


def test_resolve_all_alone_refuses_a_preset_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match=r"^experiments\.broken: got \[1\]; expected a mapping$"):
        resolve_all(edited({"experiments": {"broken": [1]}}))


def test_a_fault_is_reported_in_the_preset_that_writes_it():
    """tiny inherits default's settings: a bad value in default is named as default's."""
    with pytest.raises(ConfigError, match=r"^experiments\.default\.train\.lr: got 0;"):
        resolve_all(edited({"experiments": {"default": {"train": {"lr": 0}}}}))


def test_proj_dim_must_suit_the_cuda_projector(monkeypatch):
    config = edited({"device": "cuda"})
    monkeypatch.setattr(cfg, "cuda_projector_possible", lambda device: device != "cpu")
    with pytest.raises(ConfigError) as error:
        experiment(config, "tiny")
    assert str(error.value) == "\n".join(
        f"experiments.tiny.featurize{grid}.proj_dims[0]: got 64; expected a multiple of 512, which trak's "
        "CudaProjector (fast_jl, used on device 'cuda') needs; or set device: cpu (BasicProjector takes "
        "any positive integer)" for grid in ("", ".extra_grids[0]"))
    assert experiment({**config, "device": "cpu"}, "tiny")["featurize"]["proj_dims"] == [64]
    assert experiment(config, "default")["featurize"]["proj_dims"] == [512]


def test_fp16_training_is_refused_off_a_gpu_for_the_experiment_that_runs(monkeypatch):
    """device: auto is resolved; a preset that does not run may ask for fp16 on any device."""
    fp16 = tiny(train={"dtype": "fp16"})
    assert validate_config(edited({**fp16, "device": "cpu"}))["tiny"]["train"]["dtype"] == "fp16"  # default runs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as error:
        validate_config(edited({**fp16, "experiment": "tiny"}))
    assert str(error.value) == ('experiments.tiny.train.dtype: got "fp16"; expected fp32, tf32 or bf16 on device '
                                "auto, where torch sees no CUDA GPU: fp16 training needs a CUDA GPU")
    assert validate_config(edited({**fp16, "experiment": "tiny"}), libraries=False)  # a job's process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert validate_config(edited({**fp16, "experiment": "tiny"}))["tiny"]["train"]["dtype"] == "fp16"


def test_shipped_presets_and_new_optional_keys_pass():
    resolved = validate_config(copy.deepcopy(CONFIG))
    assert list(resolved) == list(CONFIG["experiments"])
    assert resolved["tiny"]["featurize"]["proj_dims"] == [64] and "base" not in resolved["tiny"]
    extra = tiny(train={"checkpoint_every": 50}, generate={"dtype": "tf32"}, ground_truth={"dtype": "bf16"},
                 featurize={"extra_grids": [{"functions": ["avg"], "timesteps": [2], "proj_dims": [32]}],
                            "dtype": "tf32"})
    config = edited({**extra, "device": "cuda:1"})
    resolved = validate_config(config)["tiny"]
    assert resolved["train"]["checkpoint_every"] == 50 and resolved["ground_truth"]["dtype"] == "bf16"
    assert resolved["featurize"]["extra_grids"][0]["functions"] == ["avg"] and resolved["featurize"]["dtype"] == "tf32"
    assert "dtype" not in validate_config(copy.deepcopy(CONFIG))["tiny"]["featurize"]  # no default: absent is fp32


def test_command_line_text_is_read_as_yaml():
    """`--config` hands nested values over as text; YAML reads 1e-4 as text too."""
    config = edited(tiny(subsets={"m": "6", "alpha": "0.4"}, train={"lr": "1e-4", "hflip": "false"},
                         featurize={"proj_dims": "[64, 128]"}, dataset={"classes": ["0", "1"]}))
    spec = resolve_all(config)["tiny"]
    assert spec["subsets"]["m"] == 6 and spec["subsets"]["alpha"] == 0.4
    assert spec["train"]["lr"] == 1e-4 and spec["train"]["hflip"] is False
    assert spec["featurize"]["proj_dims"] == [64, 128]
    assert spec["dataset"]["classes"] == ["0", "1"]  # class names stay text
    with pytest.raises(ConfigError, match=r'^experiments\.tiny\.subsets\.m: got "6\.5"; expected an integer >= 2$'):
        resolve_all(edited(tiny(subsets={"m": "6.5"})))
    with pytest.raises(ConfigError, match=r'^experiments\.tiny\.train\.lr: got "nan"; expected a number > 0$'):
        resolve_all(edited(tiny(train={"lr": "nan"})))


def test_every_schema_property_is_described():
    missing = []

    def walk(node, path):
        for key, sub in (node.get("properties") or {}).items():
            if "description" not in sub:
                missing.append(f"{path}.{key}")
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")

    walk(schema(), "")
    walk(schema()["$defs"]["experiment"], "experiment")
    assert missing == []


@pytest.mark.parametrize("args, line", [
    (["--config", "device=gpu"], 'device: got "gpu"; expected a string matching'),
    (["--config", 'experiments={"tiny": {"featurize": {"timesteps": [2000]}}}'],
     f"experiments.tiny.featurize.timesteps[0]: got K = 2000; {WITHIN_T}"),
    (["--config", 'experiments={"tiny": {"model": {"unet": {"freq_shift": "not-a-number"}}}}'],
     'experiments.tiny.model.unet.freq_shift: got "not-a-number"; expected an integer\n'),
    (["--config", "device=cpu", "experiment=tiny", 'experiments={"tiny": {"train": {"dtype": "fp16"}}}'],
     'experiments.tiny.train.dtype: got "fp16"; expected fp32, tf32 or bf16 on device cpu: fp16 training '
     "needs a CUDA GPU\n"),
])
def test_snakemake_stops_before_any_job(tmp_path, args, line):
    root = copy_workflow(tmp_path)
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", *args],
                            cwd=root, text=True, capture_output=True)
    assert result.returncode != 0
    assert line in result.stderr + result.stdout
    assert "Building DAG of jobs" not in result.stderr + result.stdout


def test_score_methods_and_baselines():
    """A preset without the keys gets every registered method of each kind (diffattr.methods), but
    only the pixel baselines: CLIP needs an encoder configured (score.clip). Unknown names are refused."""
    from diffattr.methods import methods_reading

    keys = schema()["$defs"]["experiment"]["properties"]["score"]["properties"]
    assert keys["baselines"]["default"] == [name for name in methods_reading("pixels")]
    spec = resolve_all(edited(tiny(score={"methods": ["relative_if"], "baselines": []},
                                   ablations=[])))["tiny"]["score"]
    assert cfg.score_methods(spec, "methods") == ["relative_if"] and cfg.score_methods(spec, "baselines") == []
    default = experiment(CONFIG, "default")["score"]
    assert cfg.score_methods(default, "methods") == list(methods_reading("features"))
    assert {"journey_trak", "das"} <= set(methods_reading("features"))
    assert cfg.score_methods(default, "trajectory_methods") == ["tracincp", "gas"]
    assert cfg.score_methods(default, "baselines") == ["pixel_dot", "pixel_cos", "clip_dot", "clip_cos"]
    with pytest.raises(ConfigError, match=r'^experiments\.tiny\.score\.methods\[1\]: got "tracin"; expected one '
                                          r'of "trak", "gradient_dot", '):
        resolve_all(edited(tiny(score={"methods": ["trak", "tracin"]})))


def test_retrain_settings_fill_in_defaults_and_size_the_pool():
    assert cfg.retrain_settings(experiment(CONFIG, "tiny"))["pool"] == 0  # no retrain section: no pool
    spec = cfg.retrain_settings(experiment(CONFIG, "tiny-retrain"))
    tiny_spec = experiment(CONFIG, "tiny")
    assert (spec["pool"], spec["ensembles"], spec["n_models"]) == (4, [1, 2], [4])
    assert (spec["seed"], spec["train_seed"], spec["alpha"]) == (43, 0, 0.5)
    assert spec["methods"] == ["empirical_if", "datamodel"] and spec["datamodel_alpha_exponents"] == [-2, 6]
    assert spec["timesteps"] == tiny_spec["ground_truth"]["timesteps"]
    assert spec["noise_seeds"] == tiny_spec["ground_truth"]["noise_seeds"]
    cifar2 = cfg.retrain_settings(experiment(CONFIG, "cifar2"))
    assert (cifar2["pool"], cifar2["timesteps"], cifar2["noise_seeds"]) == (512, 1000, [0])
    with_ensembles_only = resolve_all(edited(tiny(retrain={"ensembles": [8, 2]})))["tiny"]
    assert cfg.retrain_settings(with_ensembles_only)["pool"] == 8


UNET_TAKES = ("unet (UNet2DModel) takes sample_size, in_channels, out_channels, center_input_sample, "
              "time_embedding_type, time_embedding_dim, freq_shift, flip_sin_to_cos, down_block_types, ")
LIBRARY_BLOCKS = [
    ("misspelt UNet key", {"unet": {"blok_out_channels": [8, 16]}},
     "experiments.tiny.model.unet.blok_out_channels: got [8, 16]; expected no such key (did you mean "
     f"block_out_channels?): {UNET_TAKES}"),
    ("text for an int", {"unet": {"freq_shift": "not-a-number"}},
     'experiments.tiny.model.unet.freq_shift: got "not-a-number"; expected an integer'),
    ("int for a bool", {"unet": {"flip_sin_to_cos": 1}},
     "experiments.tiny.model.unet.flip_sin_to_cos: got 1; expected true or false"),
    ("str | None", {"unet": {"mid_block_type": 3}},
     "experiments.tiny.model.unet.mid_block_type: got 3; expected a string or null"),
    ("bool for a float", {"unet": {"mid_block_scale_factor": True}},
     "experiments.tiny.model.unet.mid_block_scale_factor: got true; expected a number"),
    ("unknown block type", {"unet": {"down_block_types": ["DownBlock2D", "DownBlok2D"]}},
     'experiments.tiny.model.unet.down_block_types[1]: got "DownBlok2D"; expected a value UNet2DModel '
     "accepts (it raised ValueError: DownBlok2D does not exist.)"),
    ("unknown activation", {"unet": {"act_fn": "gleu"}},
     'experiments.tiny.model.unet.act_fn: got "gleu"; expected a value UNet2DModel accepts (it raised '
     "ValueError: activation function gleu not found in ACT2FN mapping ['swish', 'silu', 'mish', 'gelu', 'relu'])"),
    ("negative size", {"unet": {"num_class_embeds": -2}},
     "experiments.tiny.model.unet.num_class_embeds: got -2; expected a value UNet2DModel accepts (it "
     "raised RuntimeError: Trying to create tensor with negative dimension -2: [-2, 32])"),
    ("misspelt scheduler key", {"scheduler": {"beta_schedul": "linear"}},
     'experiments.tiny.model.scheduler.beta_schedul: got "linear"; expected no such key (did you mean '
     "beta_schedule?): scheduler (DDPMScheduler) takes num_train_timesteps, beta_start, beta_end, "
     "beta_schedule, trained_betas, variance_type, clip_sample, prediction_type, thresholding, "
     "dynamic_thresholding_ratio, clip_sample_range, sample_max_value, timestep_spacing, steps_offset, "
     "rescale_betas_zero_snr"),
    ("Literal", {"scheduler": {"beta_schedule": "cosine"}},
     'experiments.tiny.model.scheduler.beta_schedule: got "cosine"; expected one of "linear", '
     '"scaled_linear", "squaredcos_cap_v2", "sigmoid"'),
    ("list item of the wrong type", {"scheduler": {"trained_betas": [0.1, "a"]}},
     'experiments.tiny.model.scheduler.trained_betas: got [0.1, "a"]; expected a value DDPMScheduler '
     "accepts (it raised TypeError: must be real number, not str)"),
]


@pytest.mark.parametrize("model, message", [case[1:] for case in LIBRARY_BLOCKS], ids=[c[0] for c in LIBRARY_BLOCKS])
def test_blocks_passed_to_a_library_class_are_held_to_it(model, message):
    """model.unet and model.scheduler are open in the schema; their keys are checked against
    UNet2DModel's and DDPMScheduler's signatures, and the blocks built on the meta device."""
    with pytest.raises(ConfigError) as error:
        validate_config(edited(tiny(model=model)))
    if message.endswith(", "):
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
    else:
        assert str(error.value) == message


def test_library_blocks_take_every_argument_and_command_line_text():
    """The classes' other arguments pass, `--config` text for an untyped key is read as YAML, and
    without `libraries` (a Snakemake job's process) the blocks are not held to their classes."""
    unet = {"freq_shift": "1", "flip_sin_to_cos": "false", "act_fn": "silu", "mid_block_scale_factor": 1,
            "attn_norm_num_groups": None}
    scheduler = {"beta_start": "1e-4", "clip_sample": "false", "timestep_spacing": "trailing"}
    model = resolve_all(edited(tiny(model={"unet": unet, "scheduler": scheduler})))["tiny"]["model"]
    assert (model["unet"]["freq_shift"], model["unet"]["flip_sin_to_cos"], model["unet"]["act_fn"]) == (1, False, "silu")
    assert model["scheduler"] == {"beta_start": 1e-4, "clip_sample": False, "timestep_spacing": "trailing"}
    assert resolve_all(edited(tiny(model={"unet": {"blok_out_channels": [8]}})), libraries=False)


def test_annotations_read_as_config_types():
    """The typing forms of older diffusers signatures read as the PEP 604 ones of newer ones."""
    from typing import Any, List, Literal, Optional, Sequence, Tuple, Union

    import numpy as np

    def fits(annotation, value):
        from jsonschema import Draft202012Validator
        return Draft202012Validator(library_blocks.annotation_schema(annotation)).is_valid(value)

    assert fits(Optional[int], None) and fits(int | None, 3) and not fits(Optional[int], "3")
    assert fits(float, 1) and fits(float, 0.5) and not fits(float, True) and not fits(int, True)
    assert fits(Tuple[str, ...], ["a", "b"]) and not fits(tuple[str, ...], ["a", 1])
    assert fits(Union[int, Tuple[int, int]], 8) and fits(Union[int, Tuple[int, int]], [8, 8])
    assert not fits(Union[int, Tuple[int, int]], [8, 8, 8]) and not fits(int | tuple[int, int], "8")
    assert fits(Literal["a", "b"], "a") and not fits(Literal["a", "b"], "c")
    assert fits(List[float], [1, 0.5]) and fits(Sequence[int], [1]) and not fits(Sequence[int], "x")
    assert fits(Any, object()) and fits(np.ndarray | List[float] | None, "anything: left to the build")
    assert messages.expected(library_blocks.annotation_schema(Union[int, Tuple[int, int], None])) == (
        "an integer or a list of 2 of (an integer) or null")


# ---------------------------------------------------------------- every leaf of every preset, spoilt

# Values of another type tried at a leaf, by the type of the preset's value there.
WRONG_TYPES = {bool: ["x", 1], int: ["x", 2.5, True], float: ["x", True], str: [5, True],
               type(None): [5, "x", True, {"bad": 1}], list: ["x", 5], dict: ["x", 5]}
# (key, with [*] for any index; type of the value) -> why a value of that type is right there too
OTHER_TYPE_ALLOWED = {
    ("dataset.path", str): "a path (null: the download, or cifar10_path)",
    ("model.unet.attention_head_dim", int): "an integer head size (null: diffusers' one head per block)",
    ("score.clip.pretrained", str): "a model directory (null: random-init weights)",
    ("model.pretrained", str): "a Stable Diffusion folder (null: the base the workflow trains)",
}
# Keys whose numbers may be negative, and why; every other number gets -1 (an int) or -0.5.
NEGATIVE_ALLOWED = {
    "score.lambda_exponents[*]": "exponents e of the lambdas {1, 2, 5} x 10^e: 10^-2 is a lambda",
    "retrain.datamodel_alpha_exponents[*]": "exponents of the ridge alphas, as lambda_exponents",
    "model.unet.freq_shift": "UNet2DModel's shift of the sinusoidal frequencies: any integer works",
}
# Keys with an upper bound, and a value beyond it (T = 1000: every preset's scheduler).
ABOVE = {
    "subsets.alpha": 1, "retrain.alpha": 1, "lds.confidence": 1, "generate.eta": 1.5,
    "train.warmup_fraction": 1.5, "train.betas[*]": 1, "model.unet.dropout": 1,
    "retrain.ensembles[*]": 1001, "retrain.n_models[*]": 1001,
    "featurize.timesteps[*]": 1001, "featurize.extra_grids[*].timesteps[*]": 1001, "retrain.timesteps": 1001,
    "ground_truth.timesteps": 1001, "generate.steps": 1001,
    "ablations[*].at.K": 1001, "ablations[*].sweep.K[*]": 1001,
}


def leaves(value, path=()):
    """(path, value) of every leaf: scalars, empty mappings and lists, and lists of scalars (both the
    list and each item); mappings and lists of mappings are walked into."""
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from leaves(sub, (*path, key))
        return
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        for i, item in enumerate(value):
            yield from leaves(item, (*path, i))
        return
    yield path, value
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, (*path, i))


def dotted(path) -> str:
    return messages.key_path("", path)


def pattern(path) -> str:
    return messages.key_path("", ["*" if isinstance(p, int) else p for p in path]).replace(".*", "[*]")


def spoilt_cases():
    """(preset, path, bad value) for every leaf of every preset of config.yaml; the skipped ones."""
    cases, skipped = [], []
    for name in CONFIG["experiments"]:
        for path, value in leaves(experiment(CONFIG, name)):
            key = pattern(path)
            for bad in WRONG_TYPES[type(value)]:
                if (key, type(bad)) in OTHER_TYPE_ALLOWED:
                    skipped.append((name, key, bad))
                else:
                    cases.append((name, path, bad))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key in NEGATIVE_ALLOWED:
                    skipped.append((name, key, -1))
                else:
                    cases.append((name, path, -1 if isinstance(value, int) else -0.5))
                if key in ABOVE:
                    cases.append((name, path, ABOVE[key]))
    return cases, skipped


def test_every_leaf_of_every_preset_refuses_a_wrong_value():
    """Each leaf of each resolved preset (model.unet's pass-through keys among them) set to a value of
    another type, a negative number or one beyond its bound: the config check names that key."""
    cases, skipped = spoilt_cases()
    assert len(cases) > 1000 and len({name for name, _, _ in cases}) == len(CONFIG["experiments"])
    resolved = {name: experiment(CONFIG, name) for name in CONFIG["experiments"]}
    missed = []
    for name, path, bad in cases:
        settings = parent = copy.copy(resolved[name])  # copies along the path only
        for part in path[:-1]:
            parent[part] = copy.copy(parent[part])
            parent = parent[part]
        parent[path[-1]] = bad
        want = f"experiments.{name}.{dotted(path)}: got "
        try:
            cfg.validate_experiment(settings, name, "cpu")
        except ConfigError as error:
            if any(line.startswith(want) for line in str(error).splitlines()):
                continue
            missed.append(f"{want}{messages.show(bad)} gave instead: {error}")
        else:
            missed.append(f"{want}{messages.show(bad)} passed")
    assert missed == []
    # every exemption is used: none outlives the key it was written for
    used = {key for _, key, _ in skipped}
    assert {key for key, _ in OTHER_TYPE_ALLOWED} | set(NEGATIVE_ALLOWED) <= used
    assert set(ABOVE) <= {pattern(path) for _, path, _ in cases}


def test_a_model_block_merges_into_its_bases_kind_unless_it_names_another():
    """artbench5 names only its prompts: it keeps artbench2's latent_lora block (LoRA, base folder); a
    preset whose model block names another kind gets none of its base's model keys."""
    five, two = experiment(CONFIG, "artbench5", libraries=False), experiment(CONFIG, "artbench2", libraries=False)
    assert five["model"] == {**two["model"], "prompts": five["model"]["prompts"]} and len(five["model"]["prompts"]) == 5
    pixel = {"kind": "pixel_ddpm", "unet": CONFIG["experiments"]["cifar2"]["model"]["unet"]}
    config = edited({"experiments": {"pix": {"base": "artbench2", "model": pixel}}})
    assert cfg._merged(config["experiments"], "pix")["model"] == pixel
