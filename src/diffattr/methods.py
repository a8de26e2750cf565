"""The attribution methods the table compares, and the store their subset predictions share.

A predictions store (`results/<exp>/scores/<name>/<split>.zarr`) is a zarr group: its attributes
hold the provenance of what was scored (query_sha256, subsets_sha256, the feature or image hashes)
and `methods`, the order of its members; member `preds/<method>` is that method's (L, m, M)
predictions, pred[l, z, j] = -sum_{i in subset j} S_l(z, i), with its grid `lambdas` (one `None`
for a method without lambda). A new method is one `Method` entry in METHODS: the planner, the score
jobs, the lds job and the table read it from there.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zarr

from .provenance import ProvenanceError, require_present
from .storage import atomic_output

RANDOM_INIT = "random-init"  # the `clip_weights` of a CLIP model that was not loaded from a checkpoint


# What a method reads, and the config list that names it: each kind is scored by its own job, which
# hands the method's `predict` an object with the operations its methods call (kernel, dot, ...).
READS = {
    "features": ("score", "methods"),                   # projected gradients (score.FeatureJob)
    "trajectory": ("score", "trajectory_methods"),      # those of several checkpoints (tracin.TrajectoryJob)
    "pixels": ("score", "baselines"),                   # the images themselves (score.DotJob)
    "embeddings": ("score", "baselines"),               # CLIP image embeddings (score.DotJob)
    "ensemble": ("retrain", "ensembles"),               # features of several retrained models (ensemble.EnsembleJob)
    "outputs": ("retrain", "methods"),                  # retrained models' outputs (retrain.RetrainJob)
    "influence": ("score", "influence_methods"),        # (E)K-FAC-preconditioned gradients (kfac.InfluenceJob)
}


@dataclass(frozen=True)
class Method:
    """One attribution method: the table's `label`, what it `reads` (a key of READS), whether its
    predictions run over the lambda grid, and `predict(job)`, its (L, m, M) predictions
    pred[l, z, j] = -sum_{i in subset j} S_l(z, i) from the job that read its inputs.
    `extra_inputs` names what it reads beside its job's own inputs (diffattr.plan.EXTRA_INPUTS:
    'journey' trajectory features, 'residual' weights); such inputs are the full model's, so a method
    with any applies to feature sets of the final weights only."""
    label: str
    reads: str
    uses_lambda: bool
    predict: Callable
    functions: tuple[str, ...] | None = None  # the feature functions it is scored on (None: every one)
    splits: tuple[str, ...] | None = None     # the query splits it exists for (None: every one)
    extra_inputs: tuple[str, ...] = ()

    def applies(self, fset, split: str) -> bool:
        """Whether a score job on feature set `fset` (a protocol.FeatureSet) for query `split`
        computes it."""
        return ((self.functions is None or fset.function in self.functions)
                and (self.splits is None or split in self.splits)
                and (not self.extra_inputs or fset.step is None))


METHODS = {
    # kernel methods: (X^T X + lambda I)^-1, train columns renormalized or not (diffattr.score.Kernel)
    "trak": Method("TRAK", "features", True, lambda job: job.kernel(None)),  # "D-TRAK" off simple: `label`
    "gradient_dot": Method("Gradient (dot)", "features", False, lambda job: job.dot(cosine=False)),
    "gradient_cos": Method("Gradient (cos)", "features", False, lambda job: job.dot(cosine=True)),
    "relative_if": Method("Relative IF", "features", True, lambda job: job.kernel("relative")),
    "renormalized_if": Method("Renormalized IF", "features", True, lambda job: job.kernel("renormalized")),
    "pixel_dot": Method("Raw pixel (dot)", "pixels", False, lambda job: job.dot(cosine=False)),
    "pixel_cos": Method("Raw pixel (cos)", "pixels", False, lambda job: job.dot(cosine=True)),
    "clip_dot": Method("CLIP (dot)", "embeddings", False, lambda job: job.dot(cosine=False)),
    "clip_cos": Method("CLIP (cos)", "embeddings", False, lambda job: job.dot(cosine=True)),
    # summed over the full model's training checkpoints (diffattr.tracin)
    "tracincp": Method("TracInCP", "trajectory", False, lambda job: job.dot(cosine=False)),
    "gas": Method("GAS", "trajectory", False, lambda job: job.dot(cosine=True)),
    # retraining-based; a store records its model count `models`
    "trak_ens": Method("TRAK ensemble", "ensemble", True, lambda job: job.kernel(None)),  # "D-TRAK ..." as trak
    "empirical_if": Method("Empirical IF", "outputs", False, lambda job: job.empirical_if()),
    "datamodel": Method("Datamodel", "outputs", False, lambda job: job.datamodel()),
    # TRAK on the generated image's DDIM-trajectory features (diffattr.journey): generated queries only
    "journey_trak": Method("Journey-TRAK", "features", True, lambda job: job.kernel(None, queries="journey"),
                           functions=("simple",), splits=("gen",), extra_inputs=("journey",)),
    # DAS: kernel scores on gradients of the noise predictor's output, times residuals (diffattr.das)
    "das": Method("DAS", "features", True, lambda job: job.kernel("weighted", weights="residual"),
                  functions=("avg",), extra_inputs=("residual",)),
    # influence functions with the GGN approximated by K-FAC or EK-FAC, over the dampings (diffattr.kfac)
    "kfac_influence": Method("K-FAC influence", "influence", True, lambda job: job.influence("kfac")),
    "ekfac_influence": Method("EK-FAC influence", "influence", True, lambda job: job.influence("ekfac")),
}


def methods_reading(*reads: str) -> tuple[str, ...]:
    """The registered methods that read any of `reads`."""
    return tuple(name for name, method in METHODS.items() if method.reads in reads)


def predictions(methods, job) -> dict[str, tuple[np.ndarray, list]]:
    """{method: (its predictions from `job`, their lambdas: the job's grid, or [None])}: what
    `write_predictions` stores."""
    for name in [name for name in methods if name not in METHODS]:
        raise ValueError(f"unknown attribution method {name!r}; known: {', '.join(METHODS)}")
    return {name: (METHODS[name].predict(job), list(job.lambdas) if METHODS[name].uses_lambda else [None])
            for name in methods}


# What every store records, and what each member of a store on gradient features records besides.
STORE_KEYS = ("methods", "query_sha256", "subsets_sha256")
FEATURE_STORE_KEYS = ("function", "K", "proj_dim")
EMBEDDING_STORE_KEYS = ("clip_config", "clip_weights")


def label(method: str, function: str | None = None, models: int | None = None,
          clip_weights: str | None = None) -> str:
    """The table's name of a method: kernel scores on `simple` features are TRAK, on others D-TRAK;
    a retraining-based method names its model count: "D-TRAK ensemble (C=4)", "Datamodel (N=256)";
    CLIP with randomly initialized weights says so: "CLIP (cos, random-init)"."""
    name = METHODS[method].label
    if method in ("trak", "trak_ens") and function != "simple":
        name = "D-" + name
    if models is not None:
        name += f" ({'C' if METHODS[method].reads == 'ensemble' else 'N'}={int(models)})"
    if METHODS[method].reads == "embeddings" and clip_weights == RANDOM_INIT:
        name = f"{name[:-1]}, {RANDOM_INIT})"
    return name


def write_predictions(path, predictions: dict[str, tuple[np.ndarray, list]], attrs: dict) -> None:
    """Write {method: (preds (L, m, M), lambdas or [None])} as one group store, atomically."""
    with atomic_output(path) as tmp:
        group = zarr.open_group(tmp, mode="w")
        group.attrs.update({**attrs, "methods": list(predictions)})
        for method, (preds, lambdas) in predictions.items():
            if len(lambdas) != len(preds):
                raise ValueError(f"{method}: {len(preds)} predictions but {len(lambdas)} lambdas")
            array = group.create_array(f"preds/{method}", shape=preds.shape, dtype=preds.dtype,
                                       chunks=preds.shape)
            array[...] = preds
            array.attrs.update({"method": method, "lambdas": [None if lam is None else float(lam)
                                                              for lam in lambdas]})


def read_predictions(path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """({method: (preds, lambdas as floats, NaN for none)}, the store's attributes), refused unless the
    store records its provenance and every method it lists."""
    try:
        group = zarr.open_group(path, mode="r")
    except zarr.errors.ContainsArrayError:
        raise ProvenanceError(f"{path} holds one array, not a group of predictions per method: it was "
                              "written by an older version of diffattr's score; recompute it") from None
    attrs = dict(group.attrs)
    require_present(STORE_KEYS, (str(path), attrs), "diffattr's score or baseline")
    out = {}
    for method in attrs["methods"]:
        if method not in METHODS:
            raise ProvenanceError(f"{path} holds predictions of method {method!r}, which diffattr does not "
                                  f"know (known: {', '.join(METHODS)})")
        if f"preds/{method}" not in group:
            raise ProvenanceError(f"{path} lists method {method!r} but holds no preds/{method}; recompute it")
        array = group[f"preds/{method}"]
        keys = ("lambdas", *{"features": FEATURE_STORE_KEYS, "trajectory": FEATURE_STORE_KEYS,
                             "ensemble": FEATURE_STORE_KEYS,
                             "embeddings": EMBEDDING_STORE_KEYS}.get(METHODS[method].reads, ()))
        require_present(keys, (f"{path} (preds/{method})", {**attrs, **array.attrs}),
                        "diffattr's score or baseline")
        lambdas = np.array([np.nan if lam is None else lam for lam in array.attrs["lambdas"]], np.float64)
        out[method] = array[...], lambdas
    return out, attrs
