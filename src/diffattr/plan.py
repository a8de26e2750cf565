"""What an experiment produces: every model, feature set, store and product path, from its resolved
settings. The rules (rules/*.smk) ask this module for their inputs and `rule all` for `products`;
the tests check its plans without Snakemake. Each product path is a template here (`PATHS`), which
the rules use as their output patterns too, so a path is written once.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

from .counterfactual import Remover, removal_name, removers, target_indices
from .methods import METHODS, READS, methods_reading
from .protocol import ARTIFACTS, DEFAULT_GT_FUNCTION, LATENT_KINDS, FeatureSet, ModelName, influence_store
from .settings import (ConfigError, as_list, counterfactual_settings, influence_settings, num_train_timesteps,
                       retrain_settings, score_methods)

QUERY_SPLITS = ("val", "gen")
SPLITS = ("train", *QUERY_SPLITS)
CIFAR10_ARCHIVE = "data/downloads/cifar-10-python.tar.gz"
# Product paths, as Snakemake output patterns: {experiment} and the other wildcards of the rules.
PATHS = {
    "images": "results/{experiment}/data/{split}.zarr",
    "index": "results/{experiment}/data/{split}.csv",
    "generated": "results/{experiment}/generated/gen.zarr",
    # a latent kind's (protocol.LATENT_KINDS): its embedded base (a diffusers Stable Diffusion folder), the
    # VAE latents of the data's splits (train's flipped images too), the generation set's decoded images
    "base": "results/{experiment}/base",
    "latents": "results/{experiment}/latents/{split}.zarr",
    "latents_flipped": "results/{experiment}/latents/{split}_flipped.zarr",
    "decoded": "results/{experiment}/generated/gen_images.zarr",
    "subsets": "results/{experiment}/subsets.csv",
    "pool_subsets": "results/{experiment}/retrain/subsets.csv",
    "model": "results/{experiment}/models/{family}/{model}",
    "full_model": "results/{experiment}/models/full",
    "trajectory": "results/{experiment}/models/full/trajectory",
    "ground_truth": "{root}/ground_truth/{model}.zarr",
    "features": "results/{experiment}/features/{fset}/{split}.zarr",
    "pool_features": "results/{experiment}/features/retrain/{model}/{fset}/{split}.zarr",
    "journey": "results/{experiment}/features/{function}_journey_k{k}/gen.zarr",
    "residual": "results/{experiment}/features/{fset}/train_residual.zarr",
    "embeddings": "results/{experiment}/embeddings/clip/{split}.zarr",
    "curvature": "results/{experiment}/curvature/kfac.pt",
    "influence_features": "results/{experiment}/features/{istore}/{split}.zarr",
    "scores": "results/{experiment}/scores/{scores}/{qsplit}.zarr",
    "lds": "{root}/lds/{scores}_{qsplit}.csv",
    "lds_curve": "{root}/lds/{scores}_{qsplit}.lambdas.csv",
    "ablation": "results/{experiment}/ablations/{ablation}.{ext}",
    "table": "results/lds_{experiment}.csv",
    "figure": "results/{experiment}/figures/{figure}.png",  # and the .svg beside it
    # the counterfactual evaluation (diffattr.counterfactual); {removal} is <remover>_n<removed count>
    "removal_kept": "results/{experiment}/counterfactual/removals/{removal}.kept.csv",
    "removal": "results/{experiment}/counterfactual/removals/{removal}.csv",
    "counterfactual_model": "results/{experiment}/models/counterfactual/{removal}/t{target}",
    "regenerated": "results/{experiment}/counterfactual/regenerated/{removal}/t{target}.zarr",
    "regenerated_full": "results/{experiment}/counterfactual/regenerated/full.zarr",
    "counterfactual_images": "results/{experiment}/counterfactual/images.zarr",
    "counterfactual_medians": "results/{experiment}/counterfactual/medians.csv",
    "counterfactual_tests": "results/{experiment}/counterfactual/tests.csv",
    "counterfactual": "results/counterfactual_{experiment}.csv",
    "counterfactual_summary": "results/counterfactual_{experiment}.md",
}


def path(kind: str, **fields) -> str:
    return PATHS[kind].format(**fields)


# The {root} of the ground truth and of the LDS against it: for the protocol's L_Simple, and for another
# model-output function {gt} (the ground-truth ablation).
TRUTH_ROOT, OTHER_TRUTH_ROOT = "results/{experiment}", "results/{experiment}/truth_{gt}"


def truth_root(experiment: str, gt_function: str = DEFAULT_GT_FUNCTION) -> str:
    """Where the ground truth of a model-output function and the LDS against it go: the protocol's
    L_Simple in results/<exp>/ as always, any other under results/<exp>/truth_<function>/."""
    root = TRUTH_ROOT if gt_function == DEFAULT_GT_FUNCTION else OTHER_TRUTH_ROOT
    return root.format(experiment=experiment, gt=gt_function)


# ---------------------------------------------------------------- feature sets

def feature_sets(featurize: dict, ablations=()) -> list[FeatureSet]:
    """Every feature set of the final weights, each once, in config order: the featurize block's grid
    and that of each entry of its `extra_grids` (the paper's function table at k = 4096, say), each
    functions x timesteps x proj_dims x scheme x noises (an extra grid's scheme and noises default to
    the block's), then the sets that the `ablations` sweep over and the grids lack."""
    sets: dict[FeatureSet, None] = {}
    for grid in [featurize, *featurize.get("extra_grids", [])]:
        schemes = as_list(grid.get("scheme", featurize.get("scheme", "uniform")))
        noises = as_list(grid.get("noises", featurize.get("noises", 1)))
        for function, count, dim, scheme, n in itertools.product(grid["functions"], grid["timesteps"],
                                                                 grid["proj_dims"], schemes, noises):
            sets[FeatureSet(str(function), int(count), int(dim), str(scheme), int(n))] = None
    for ablation in ablations:
        sets.update(dict.fromkeys(point.features for point in ablation_points(ablation)))
    return list(sets)


def trajectories(featurize: dict) -> dict[FeatureSet, list[int]]:
    """{feature set of the final weights: its kept checkpoint steps, ascending}: each (function, K, k)
    of a grid that lists `checkpoints` (default scheme and noises), with the union of the steps listed
    for it. Each step's features are the set `at_step(step)`; TracInCP sums over them and the final."""
    out: dict[FeatureSet, set[int]] = {}
    for grid in [featurize, *featurize.get("extra_grids", [])]:
        for function, count, dim in itertools.product(grid["functions"], grid["timesteps"], grid["proj_dims"]):
            if grid.get("checkpoints"):
                out.setdefault(FeatureSet(str(function), int(count), int(dim)), set()).update(
                    int(step) for step in grid["checkpoints"])
    return {fset: sorted(steps) for fset, steps in out.items()}


# The values of what an ablation may leave out of `sweep:` and `at:` (function, K and k it may not).
ABLATION_DEFAULTS = {"scheme": "uniform", "noises": 1, "gt_function": DEFAULT_GT_FUNCTION}


@dataclass(frozen=True)
class AblationPoint:
    """One point of an ablation's sweep: the swept values (lambda aside), the feature set and the
    ground-truth function they select."""
    values: tuple[tuple[str, object], ...]
    features: FeatureSet
    gt_function: str


def ablation_points(ablation: dict) -> list[AblationPoint]:
    """The product of the ablation's `sweep` lists (in their order; a `lambda` sweep selects rows of
    each point's per-lambda table instead), each completed by `at` and ABLATION_DEFAULTS."""
    swept = {key: as_list(values) for key, values in ablation["sweep"].items() if key != "lambda"}
    points = []
    for combination in itertools.product(*swept.values()):
        values = dict(zip(swept, combination))
        chosen = {**ABLATION_DEFAULTS, **ablation.get("at", {}), **values}
        fset = FeatureSet(str(chosen["function"]), int(chosen["K"]), int(chosen["k"]), str(chosen["scheme"]),
                          int(chosen["noises"]))
        points.append(AblationPoint(tuple(values.items()), fset, str(chosen["gt_function"])))
    return points


# ---------------------------------------------------------------- the plan of one experiment

class Plan:
    """The products of experiment `experiment` with resolved `settings`; `cifar10_path` is the
    top-level config's local CIFAR-10 copy (None: the downloaded archive)."""

    def __init__(self, experiment: str, settings: dict, cifar10_path: str | None = None):
        self.experiment, self.cifar10_path = experiment, cifar10_path
        self.root = f"results/{experiment}"
        self.latent = settings["model"].get("kind") in LATENT_KINDS
        if self.latent and settings["model"].get("pretrained") is None:  # the base the workflow builds
            settings = {**settings, "model": {**settings["model"], "pretrained": path("base", experiment=experiment)}}
        self.settings = settings

    # --- names

    @cached_property
    def lds_models(self) -> list[str]:
        """Model names s<subset>-r<training seed>, one per (subset, seed)."""
        spec = self.settings["subsets"]
        return [ModelName(j, int(seed)).name for j in range(int(spec["m"])) for seed in spec["train_seeds"]]

    @property
    def num_train_timesteps(self) -> int:
        return num_train_timesteps(self.settings)

    def threads(self, stage: str) -> int:
        """CPU threads of the stage's jobs (settings `threads.<stage>`, 1 where not set)."""
        return int((self.settings.get("threads") or {}).get(stage, 1))

    @cached_property
    def main(self) -> dict:
        """The preset's main setting, which the headline table and the figures show: the featurize
        grid's first K and k, and the first of its lds.lambda_rules."""
        spec = self.settings["featurize"]
        return {"timesteps": int(as_list(spec["timesteps"])[0]), "proj_dim": int(as_list(spec["proj_dims"])[0]),
                "lambda_rule": str(self.settings["lds"]["lambda_rules"][0])}

    @cached_property
    def retrain(self) -> dict:
        return retrain_settings(self.settings)

    def pool_models(self, count: int | None = None) -> list[str]:
        """The first `count` (default all) models of the retraining pool, s<subset>-r<retrain.train_seed>."""
        count = self.retrain["pool"] if count is None else int(count)
        if count > self.retrain["pool"]:
            raise ConfigError(f"experiments.{self.experiment}.retrain: a target needs {count} retrained "
                              f"models, but the pool has {self.retrain['pool']} (the largest of "
                              f"retrain.n_models {self.retrain['n_models']} and retrain.ensembles "
                              f"{self.retrain['ensembles']})")
        return [ModelName(j, int(self.retrain["train_seed"])).name for j in range(count)]

    @cached_property
    def final_sets(self) -> list[FeatureSet]:
        """Feature sets of the final weights: the featurize grids' and those the ablations sweep over."""
        return feature_sets(self.settings["featurize"], self.settings.get("ablations", []))

    @cached_property
    def trajectories(self) -> dict[FeatureSet, list[int]]:
        return trajectories(self.settings["featurize"])

    @cached_property
    def feature_sets(self) -> list[FeatureSet]:
        """Every feature set: those of the final weights, then those of kept training checkpoints."""
        checkpoints = [fset.at_step(step) for fset, steps in self.trajectories.items() for step in steps]
        return [*self.final_sets, *dict.fromkeys(checkpoints)]

    def checkpoint_steps(self, fset: FeatureSet) -> list[int]:
        """The kept steps a TracInCP / GAS store of `fset` sums over (then the final weights)."""
        if fset not in self.trajectories:
            raise ConfigError(f"experiments.{self.experiment}: no featurize grid lists checkpoints for "
                              f"{fset.name}, so it has no TracInCP / GAS store")
        return self.trajectories[fset]

    @cached_property
    def ensemble_sets(self) -> list[FeatureSet]:
        """The feature sets of the featurize grid itself (extra_grids aside): the ensembles'."""
        return feature_sets({key: value for key, value in self.settings["featurize"].items()
                             if key != "extra_grids"})

    def methods(self, reads: str) -> list[str]:
        """The experiment's methods that read `reads`, from the config list diffattr.methods.READS names
        for it: the ensembles' whenever retrain.ensembles lists a size, Empirical IF and Datamodel
        (retrain.methods) whenever retrain.n_models lists a count."""
        if reads == "ensemble":
            return list(methods_reading("ensemble")) if self.retrain["ensembles"] else []
        if reads == "outputs":
            return list(self.retrain["methods"]) if self.retrain["n_models"] else []
        section, key = READS[reads]
        return [name for name in score_methods(self.settings[section], key) if METHODS[name].reads == reads]

    def scored(self, fset: FeatureSet, split: str) -> list[str]:
        """The methods a score job on `fset`'s features for query `split` computes."""
        return [name for name in self.methods("features") if METHODS[name].applies(fset, split)]

    def extra_inputs(self, fset: FeatureSet, split: str) -> dict[str, str]:
        """{input name: path} of what the methods scored on `fset` for `split` read beside the features
        (Journey-TRAK's trajectory features, DAS's residual weights)."""
        return {extra: EXTRA_INPUTS[extra](self, fset) for name in self.scored(fset, split)
                for extra in METHODS[name].extra_inputs}

    @cached_property
    def influence(self) -> dict | None:
        return influence_settings(self.settings)

    def influence_stores(self) -> list[str]:
        """The influence functions' predictions stores (protocol.influence_store), one per measurement."""
        spec = self.influence
        if not spec or not self.methods("influence"):
            return []
        return [influence_store(f, spec["K"], spec["proj_dim"]) for f in spec["functions"]]

    def influence_train(self) -> str:
        """The influence store whose features hold the train gradients: the training loss's (simple)."""
        return influence_store("simple", self.influence["K"], self.influence["proj_dim"])

    def trajectory_stores(self) -> list[FeatureSet]:
        return list(self.trajectories) if self.methods("trajectory") else []

    def score_stores(self) -> list[str]:
        """Names of the experiment's predictions stores (PATHS['scores']): one per feature set, per
        TracInCP / GAS store (<set>_tracin), per similarity baseline, per ensemble (<set>_ens<C>)
        and per model count of Empirical IF and Datamodel (retrain_n<N>)."""
        return [*(fset.name for fset in self.feature_sets),
                *(f"{fset.name}_tracin" for fset in self.trajectory_stores()),
                *self.methods("pixels"), *self.methods("embeddings"),
                *(f"{fset.name}_ens{c}" for fset in self.ensemble_sets for c in self.retrain["ensembles"]),
                *(f"retrain_n{n}" for n in self.retrain["n_models"]),
                *self.influence_stores()]

    def ablation(self, name: str) -> dict:
        ablations = {a["name"]: a for a in self.settings.get("ablations", [])}
        if name not in ablations:
            raise ConfigError(f"the target's ablation: got {name!r}; expected one of the ablations of "
                              f"experiments.{self.experiment}: {', '.join(ablations) or 'none'}")
        return ablations[name]

    def ablation_tables(self, name: str) -> list[tuple[dict, str, str]]:
        """[(swept values, query split, LDS table)] of every point of ablation `name`: the per-lambda
        tables for a lambda sweep, the LDS tables otherwise."""
        spec = self.ablation(name)
        kind = "lds_curve" if "lambda" in spec["sweep"] else "lds"
        return [(dict(point.values), split, path(kind, root=truth_root(self.experiment, point.gt_function),
                                                 scores=point.features.name, qsplit=split))
                for point in ablation_points(spec) for split in QUERY_SPLITS]

    def other_truths(self) -> list[str]:
        """The model-output functions other than L_Simple that the ablations take as ground truth."""
        return list(dict.fromkeys(point.gt_function for ablation in self.settings.get("ablations", [])
                                  for point in ablation_points(ablation)
                                  if point.gt_function != DEFAULT_GT_FUNCTION))

    # --- the counterfactual evaluation (not part of `products`: its own target)

    @cached_property
    def counterfactual(self) -> dict:
        """The resolved `counterfactual` section; refused when the preset has none or a remover names a
        feature set the experiment does not compute."""
        spec = counterfactual_settings(self.settings)
        if spec is None:
            raise ConfigError(f"experiments.{self.experiment}.counterfactual: got no value; expected the section "
                              "that results/counterfactual_<experiment>.csv is built from (docs/methods.md)")
        names = [fset.name for fset in self.final_sets]
        for i, remover in enumerate(removers(spec)):
            if remover.features is not None and remover.features.name not in names:
                raise ConfigError(f"experiments.{self.experiment}.counterfactual.methods[{i}].features: got "
                                  f"{remover.features.name!r}; expected one of the experiment's feature sets: "
                                  f"{', '.join(names)}")
        return spec

    @cached_property
    def removals(self) -> dict[str, tuple[Remover, int]]:
        """{removal set name: (remover, removed count)}: every remover x removed count."""
        spec = self.counterfactual
        return {removal_name(r, k): (r, int(k)) for r in removers(spec) for k in spec["removed"]}

    def removal_entry(self, removal: str) -> dict:
        """The config entry of a removal set's remover (counterfactual.methods), as a job's param."""
        remover = self.removals[removal][0]
        return next(entry for entry in self.counterfactual["methods"] if removers({"methods": [entry]})[0] == remover)

    @cached_property
    def counterfactual_targets(self) -> list[int]:
        """The generated images that are targets (their indices in the generation set), target j first."""
        spec = self.counterfactual
        return target_indices(self.settings["generate"]["n"], spec["targets"], spec["target_seed"])

    def removal_inputs(self, removal: str) -> dict[str, str]:
        """What a removal job reads: the train index (its count), and for a method its train and
        generated-query features, its own extra inputs and the LDS table that chose its lambda."""
        remover, _ = self.removals[removal]
        out = {"train_index": path("index", experiment=self.experiment, split="train")}
        if remover.features is not None:
            out.update(train=self.features(remover.features, "train"), query=self.features(remover.features, "gen"),
                       **{extra: EXTRA_INPUTS[extra](self, remover.features)
                          for extra in METHODS[remover.method].extra_inputs})
            if remover.uses_lambda:
                out["lds"] = path("lds", root=self.root, scores=remover.features.name, qsplit="gen")
        return out

    def counterfactual_jobs(self) -> dict[str, list[str]]:
        """{rule: the first output of each job} of results/counterfactual_<experiment>.csv beyond `jobs()`."""
        e, targets = self.experiment, range(len(self.counterfactual_targets))
        return {
            "counterfactual_removal": [path("removal_kept", experiment=e, removal=r) for r in self.removals],
            "train_counterfactual": [self.weights(path("counterfactual_model", experiment=e, removal=r, target=j))
                                     for r in self.removals for j in targets],
            "regenerate_full": [path("regenerated_full", experiment=e)],
            "regenerate_counterfactual": [path("regenerated", experiment=e, removal=r, target=j)
                                          for r in self.removals for j in targets],
            "counterfactual": [path("counterfactual", experiment=e)],
        }

    # --- paths

    def weights(self, directory: str) -> str:
        return f"{directory}/{ARTIFACTS['weights']}"

    def images(self, split: str) -> str:
        """The image store of a split: the dataset's train / val, or the generation set's images."""
        if split == "gen":
            return path("decoded" if self.latent else "generated", experiment=self.experiment)
        return path("images", experiment=self.experiment, split=split)

    def samples(self, split: str) -> str:
        """The store of a split that the models read (training, ground truth, features): its images, or
        a latent kind's VAE latents (the generation set: its latents, as sampled)."""
        if split == "gen":
            return path("generated", experiment=self.experiment)
        return path("latents", experiment=self.experiment, split=split) if self.latent else self.images(split)

    def train_inputs(self) -> dict[str, str]:
        """A training job's data: the train split's samples, and a latent kind's flipped samples when
        training flips (train.hflip: the latents of the flipped images, diffattr.train)."""
        flipped = self.latent and self.settings["train"].get("hflip", False)
        return {"images": self.samples("train"),
                **({"flipped": path("latents_flipped", experiment=self.experiment, split="train")} if flipped else {})}

    def base(self) -> str | None:
        """A latent kind's base model folder (model.pretrained, or the one the workflow builds); None otherwise."""
        return self.settings["model"]["pretrained"] if self.latent else None

    def builds_base(self) -> bool:
        return self.latent and self.base() == path("base", experiment=self.experiment)

    def features(self, fset: FeatureSet, split: str) -> str:
        return path("features", experiment=self.experiment, fset=fset.name, split=split)

    def dataset_path(self) -> str | None:
        """The dataset's local copy (a CIFAR-10 preset with `path: null` reads the top-level
        `cifar10_path`, else the downloaded archive); None for sklearn's digits."""
        spec = self.settings["dataset"]
        if spec["source"] == "cifar10" and spec.get("path") is None:
            return self.cifar10_path or CIFAR10_ARCHIVE
        return spec.get("path")

    # --- jobs

    def jobs(self) -> dict[str, list[str]]:
        """{rule: the first output of each of its jobs}: the whole DAG of `rule all`."""
        e, root = self.experiment, self.root
        scores = lambda name: [path("scores", experiment=e, scores=name, qsplit=s) for s in QUERY_SPLITS]
        sets = self.feature_sets
        retrain = self.retrain
        jobs = {
            "download_cifar10": [CIFAR10_ARCHIVE] if self.dataset_path() == CIFAR10_ARCHIVE else [],
            "dataset": [path("images", experiment=e, split="train")],
            "base": [path("base", experiment=e)] if self.builds_base() else [],
            "encode": [path("latents", experiment=e, split=s) for s in ("train", "val")] if self.latent else [],
            "encode_flipped": [flipped] if (flipped := self.train_inputs().get("flipped")) else [],
            "decode_generated": [path("decoded", experiment=e)] if self.latent else [],
            "subsets": [path("subsets", experiment=e)],
            "train_full": [self.weights(path("full_model", experiment=e))],
            "train_lds": [self.weights(path("model", experiment=e, family="lds", model=m)) for m in self.lds_models],
            "generate": [path("generated", experiment=e)],
            "ground_truth": [path("ground_truth", root=root, model=m) for m in [
                *self.lds_models, *(f"retrain/{m}" for m in self.pool_models(max([0, *retrain["n_models"]])))]],
            "featurize": [self.features(fset, split) for fset in sets for split in SPLITS],
            **{rule: [] for rule in EXTRA_RULES.values()},  # the methods' extra inputs, below
            "score": [p for fset in sets for p in scores(fset.name)],
            "tracin": [p for fset in self.trajectory_stores() for p in scores(f"{fset.name}_tracin")],
            "baseline": [p for name in [*self.methods("pixels"), *self.methods("embeddings")] for p in scores(name)],
            "embed_clip": ([path("embeddings", experiment=e, split=s) for s in SPLITS]
                           if self.methods("embeddings") else []),
            "retrain_subsets": [path("pool_subsets", experiment=e)] if retrain["pool"] else [],
            "train_retrain": [self.weights(path("model", experiment=e, family="retrain", model=m))
                              for m in self.pool_models()],
            "featurize_retrained": [path("pool_features", experiment=e, model=m, fset=fset.name, split=s)
                                    for m in self.pool_models(max([0, *retrain["ensembles"]]))
                                    for fset in self.ensemble_sets for s in SPLITS],
            "score_ensemble": [p for fset in self.ensemble_sets for c in retrain["ensembles"]
                               for p in scores(f"{fset.name}_ens{c}")],
            "retrain_score": [p for n in retrain["n_models"] for p in scores(f"retrain_n{n}")],
            "curvature": [path("curvature", experiment=e)] if self.influence_stores() else [],
            "influence_features": [path("influence_features", experiment=e, istore=name, split=s) for name, s in [
                *([(self.influence_train(), "train")] if self.influence_stores() else []),
                *((name, s) for name in self.influence_stores() for s in QUERY_SPLITS)]],
            "influence_score": [p for name in self.influence_stores() for p in scores(name)],
            "lds": [path("lds", root=root, scores=name, qsplit=s) for name in self.score_stores() for s in QUERY_SPLITS],
        }
        for fset in self.final_sets:
            for split in QUERY_SPLITS:
                for extra, where in self.extra_inputs(fset, split).items():
                    if where not in jobs[EXTRA_RULES[extra]]:
                        jobs[EXTRA_RULES[extra]].append(where)
        jobs["ground_truth_other_function"] = [path("ground_truth", root=truth_root(e, gt), model=m)
                                               for gt in self.other_truths() for m in self.lds_models]
        ablations = self.settings.get("ablations", [])
        jobs["lds_other_truth"] = list(dict.fromkeys(
            path("lds", root=truth_root(e, point.gt_function), scores=point.features.name, qsplit=split)
            for ablation in ablations for point in ablation_points(ablation)
            if point.gt_function != DEFAULT_GT_FUNCTION for split in QUERY_SPLITS))
        names = [ablation["name"] for ablation in ablations]
        jobs["ablation"] = [path("ablation", experiment=e, ablation=name, ext="csv") for name in names]
        jobs["table"] = [path("table", experiment=e)]
        from .figure_plan import figures  # imported here: it imports this module
        jobs["figure"] = [path("figure", experiment=e, figure=name) for name in figures(self)]
        return {rule: outputs for rule, outputs in jobs.items() if outputs}

    def products(self) -> list[str]:
        """Every output of the experiment, intermediate ones included: `rule all` asks for all of them,
        since Snakemake regenerates a deleted intermediate file (a model's weights, say) only when some
        target asks for it, and then reruns what depends on it."""
        return [output for outputs in self.jobs().values() for output in outputs]


# What a method's `extra_inputs` name: the store's path, and the rule that makes it.
EXTRA_INPUTS = {
    "journey": lambda plan, fset: path("journey", experiment=plan.experiment, function=fset.function,
                                       k=fset.proj_dim),
    "residual": lambda plan, fset: path("residual", experiment=plan.experiment, fset=fset.name),
}
EXTRA_RULES = {"journey": "featurize_journey", "residual": "residual"}
