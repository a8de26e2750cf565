"""Which figures an experiment draws, what each reads and its caption: only those its outputs allow
(no interpolation curve without interp functions, no ensemble figure without retrained models).
The figure rule (rules/figures.smk) asks this module; diffattr.figures draws them. The counterfactual
figure is not one of `figures`: the counterfactual rule draws it from its own outputs, with `params`.
Planning only: no torch, no matplotlib."""
from __future__ import annotations

from .counterfactual import removers
from .methods import METHODS, label
from .plan import EXTRA_INPUTS, path, truth_root
from .protocol import ARTIFACTS, FeatureSet
from .table import HEADLINE_FUNCTIONS

LOSS_MODELS = 4  # LDS models whose loss curves are drawn beside the full model's
GALLERY_QUERIES = 3  # a gallery's queries: the first of its split, the same in every run of a preset
GALLERY_TOP = 5      # proponents and opponents shown per query and method
# A gallery scores its queries over the n singleton subsets of the training set (diffattr.gallery), an
# (n, n) mask: 200 MB at cifar2's 5000 training images, 20 GB at cifar10's 50000, which gets none.
GALLERY_MAX_TRAIN = 10000
COUNTERFACTUAL_TARGETS = 6  # rows of the counterfactual figure: its first targets


def _main_sets(plan) -> list[FeatureSet]:
    main = plan.main
    return [f for f in plan.final_sets if (f.n_timesteps, f.proj_dim, f.tags) == (main["timesteps"], main["proj_dim"], "")]


def _kernel_methods(plan) -> list[str]:
    return [m for m in plan.methods("features") if METHODS[m].uses_lambda and not METHODS[m].extra_inputs]


def headline_sets(plan) -> list[FeatureSet]:
    """TRAK's and D-TRAK's feature sets at the main K and k: simple, and the first other function of
    HEADLINE_FUNCTIONS (else of the grid), as the headline table shows them."""
    sets = {f.function: f for f in _main_sets(plan)}
    others = [f for f in sets if f != "simple" and not f.startswith("interp")]
    chosen = [f for f in HEADLINE_FUNCTIONS if f in others] + others
    return [sets[f] for f in ["simple", *chosen[:1]] if f in sets]


def gallery_methods(plan, split: str) -> list[tuple[str, FeatureSet | None]]:
    """The methods a gallery shows, with their feature set: TRAK and D-TRAK on the `headline_sets`;
    DAS; a raw pixel baseline (cosine where planned)."""
    sets = {f.function: f for f in _main_sets(plan)}
    out = []
    if "trak" in plan.methods("features"):
        out += [("trak", fset) for fset in headline_sets(plan)]
    if "das" in plan.methods("features") and "avg" in sets and METHODS["das"].applies(sets["avg"], split):
        out.append(("das", sets["avg"]))
    pixels = plan.methods("pixels")
    if pixels:
        out.append(("pixel_cos" if "pixel_cos" in pixels else pixels[0], None))
    return out


def figures(plan) -> list[str]:
    """The figures experiment `plan` draws, in the report's order."""
    sets, out = plan.final_sets, ["headline"]
    main_k = [f for f in sets if f.proj_dim == plan.main["proj_dim"] and f.tags == ""]
    if len({f.function for f in main_k if not f.function.startswith("interp")}) > 1 and "trak" in plan.methods("features"):
        out.append("functions")
    if any(f.function.startswith("interp") for f in sets) and "trak" in plan.methods("features"):
        out.append("interpolation")
    if _kernel_methods(plan):
        out.append("lambda")
    if plan.trajectories:
        out.append("checkpoints")
    if plan.retrain["ensembles"] or plan.retrain["n_models"]:
        out.append("ensembles")
    if int(plan.settings["dataset"].get("n_train") or 0) <= GALLERY_MAX_TRAIN:
        out += [f"gallery_{split}" for split in ("val", "gen") if gallery_methods(plan, split)]
    return [*out, "losses", "samples"]


def category(name: str) -> str:
    """The report's section of figure `name`."""
    if name.startswith("gallery_"):
        return "Galleries"
    if name == "counterfactual":
        return "Counterfactual evaluation"
    return "Training and samples" if name in ("losses", "samples") else "LDS"


def inputs(plan, name: str) -> dict[str, str | list[str]]:
    """{input name: path or paths} of figure `name`."""
    e = plan.experiment
    table = path("table", experiment=e)
    if name in ("headline", "functions", "interpolation", "checkpoints", "ensembles"):
        return {"table": table}
    if name == "lambda":
        return {"table": table, "curves": [path("lds_curve", root=truth_root(e), scores=f.name, qsplit=s)
                                           for f in headline_sets(plan) for s in ("val", "gen")]}
    if name.startswith("gallery_"):
        split = name.removeprefix("gallery_")
        out = {"table": table, "train_images": plan.images("train"), "query_images": plan.images(split)}
        for i, (method, fset) in enumerate(gallery_methods(plan, split)):
            if fset is None:
                out.update({f"m{i}_train": plan.images("train"), f"m{i}_query": plan.images(split)})
            else:
                out.update({f"m{i}_train": plan.features(fset, "train"), f"m{i}_query": plan.features(fset, split)})
                if "residual" in METHODS[method].extra_inputs:
                    out[f"m{i}_residual"] = EXTRA_INPUTS["residual"](plan, fset)
        return out
    if name == "losses":
        full = f"{path('full_model', experiment=e)}/{ARTIFACTS['loss_log']}"
        return {"full": full, "lds": [f"{path('model', experiment=e, family='lds', model=m)}/{ARTIFACTS['loss_log']}"
                                      for m in plan.lds_models[:LOSS_MODELS]]}
    if name == "samples":
        return {"images": plan.images("gen")}
    raise ValueError(f"unknown figure {name!r}; expected one of {', '.join(figures(plan))}")


def params(plan, name: str) -> dict:
    """What figure `name` is drawn from beside its inputs: the main setting, the gallery's methods,
    and its caption (workflow/report/figure.rst shows it in the report)."""
    out = {"experiment": plan.experiment, "main": plan.main, "caption": caption(plan, name)}
    if name.startswith("gallery_"):
        out["methods"] = [{"method": m, "function": None if f is None else f.function,
                           "label": label(m, None if f is None else f.function)}
                          for m, f in gallery_methods(plan, name.removeprefix("gallery_"))]
    if name == "counterfactual":
        spec = plan.counterfactual
        out.update(targets=min(COUNTERFACTUAL_TARGETS, int(spec["targets"])), removed=int(spec["removed"][0]),
                   removers=[{"name": r.name, "label": r.label} for r in removers(spec)])
    return out


def caption(plan, name: str) -> str:
    """What figure `name` shows and the settings behind it, in one paragraph."""
    main, spec = plan.main, plan.settings
    setting = (f"K = {main['timesteps']} timesteps, k = {main['proj_dim']} projections, lambda chosen by the "
               f"'{main['lambda_rule']}' rule; LDS over {spec['subsets']['m']} subsets x "
               f"{len(spec['subsets']['train_seeds'])} training seeds, {spec['dataset'].get('n_train')} training images")
    texts = {
        "headline": "LDS (%) of each method at the preset's main setting, with its 95% bootstrap interval, "
                    "validation and generated queries side by side (the headline table of "
                    f"results/lds_{plan.experiment}.md). Where the preset is one of the paper's, the paper's "
                    "Table 2 value (mean and standard deviation) is marked beside ours.",
        "functions": "LDS (%) of TRAK / D-TRAK per model-output function (rows) and number of timesteps K "
                     "(columns), the paper's Table 1; validation and generated queries.",
        "interpolation": "LDS (%) of D-TRAK on the interpolated function (eta 0: L_Square, eta 0.5: TRAK up to a "
                         "factor), with 95% intervals, as the paper's Figure 1.",
        "lambda": "LDS (%) against lambda, per kernel method on TRAK's and D-TRAK's feature sets (one panel per "
                  "function and query split); the oracle and the held-out choices of lambda are marked.",
        "checkpoints": "LDS (%) of TRAK / D-TRAK on the features of each kept training checkpoint and of the final "
                       "weights, and of TracInCP and GAS (summed over them) as horizontal lines.",
        "ensembles": "LDS (%) against the number of retrained models: TRAK / D-TRAK ensembles (C models), "
                     "Empirical IF and Datamodel (N models), with 95% intervals.",
        "losses": f"Training loss per step of the full model and of the first {LOSS_MODELS} LDS models "
                  f"({spec['train']['full_steps']} and {spec['train']['lds_steps']} steps), with a moving average.",
        "samples": f"The generated queries: {spec['generate']['n']} DDIM samples of the full model "
                   f"({spec['generate']['steps']} steps, eta {spec['generate']['eta']}).",
    }
    if name == "counterfactual":
        return counterfactual_caption(plan)
    if name.startswith("gallery_"):
        split = {"val": "validation", "gen": "generated"}[name.removeprefix("gallery_")]
        return (f"Attribution gallery of the first {GALLERY_QUERIES} {split} queries: for each method, the query "
                f"(left) and its top {GALLERY_TOP} proponents (highest scores, first row) and opponents (lowest scores, second "
                "row) among the training images, each with its score. " + setting + ".")
    return texts[name] + " " + setting + "."


def counterfactual_caption(plan) -> str:
    """The counterfactual figure's caption: its targets, removed count, removers and CLIP weights."""
    spec = plan.counterfactual
    shown = min(COUNTERFACTUAL_TARGETS, int(spec["targets"]))
    pretrained = (plan.settings["score"].get("clip") or {}).get("pretrained")
    clip = ("CLIP random-init (score.clip.pretrained is null): its cosine says nothing about semantic closeness"
            if pretrained is None else f"CLIP weights {pretrained}")
    return (f"Counterfactual evaluation: the first {shown} of {spec['targets']} generated targets (rows), the full "
            f"model's regeneration (left) and each retrained model's after removing the top {spec['removed'][0]} "
            f"training images of {', '.join(r.label for r in removers(spec))} (columns), titled with the L2 to the "
            "original and the CLIP cosine; below, each method's median L2 and CLIP cosine over all targets with "
            f"its {spec['confidence']:.0%} bootstrap interval ({clip}). Same generator seed per target; "
            f"results/counterfactual_{plan.experiment}.md has the paired tests.")
