"""The attribution methods the table compares, and the store their subset predictions share.

A predictions store (`results/<exp>/scores/<name>/<split>.zarr`) is a zarr group: its attributes
hold the provenance of what was scored (query_sha256, subsets_sha256, the feature or image hashes)
and `methods`, the order of its members; member `preds/<method>` is that method's (L, m, M)
predictions, pred[l, z, j] = -sum_{i in subset j} S_l(z, i), with its grid `lambdas` (one `None`
for a method without lambda). A new method joins by a `Method` entry here and the code that
computes its predictions; the lds job reads whatever methods a store lists.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from .provenance import ProvenanceError, require_present
from .storage import atomic_output

RANDOM_INIT = "random-init"  # the `clip_weights` of a CLIP model that was not loaded from a checkpoint


@dataclass(frozen=True)
class Method:
    label: str           # the table's `method` column
    inputs: str          # 'features' (projected gradients), 'trajectory' (projected gradients of
                         # several training checkpoints), 'pixels' (the images themselves),
                         # 'embeddings' (CLIP image embeddings, diffattr.clip),
                         # 'ensemble' (features of several retrained models), 'outputs' (their losses)
    uses_lambda: bool    # predictions over the lambda grid, one lambda chosen per rule
    functions: tuple[str, ...] | None = None  # the feature functions it is scored on (None: every one)
    splits: tuple[str, ...] | None = None     # the query splits it exists for (None: every one)

    def applies(self, function: str | None, split: str) -> bool:
        """Whether a score job on features of `function` for query split `split` computes it."""
        return ((self.functions is None or function in self.functions)
                and (self.splits is None or split in self.splits))


METHODS = {
    "trak": Method("TRAK", "features", True),  # "D-TRAK" for any function but simple: see `label`
    "gradient_dot": Method("Gradient (dot)", "features", False),
    "gradient_cos": Method("Gradient (cos)", "features", False),
    "relative_if": Method("Relative IF", "features", True),
    "renormalized_if": Method("Renormalized IF", "features", True),
    "pixel_dot": Method("Raw pixel (dot)", "pixels", False),
    "pixel_cos": Method("Raw pixel (cos)", "pixels", False),
    "clip_dot": Method("CLIP (dot)", "embeddings", False),
    "clip_cos": Method("CLIP (cos)", "embeddings", False),
    "tracincp": Method("TracInCP", "trajectory", False),  # summed over training checkpoints: tracin.py
    "gas": Method("GAS", "trajectory", False),
    # retraining-based (rules/ensemble.smk, rules/retrain.smk); a store records its model count `models`
    "trak_ens": Method("TRAK ensemble", "ensemble", True),  # "D-TRAK ensemble" off simple, as trak
    "empirical_if": Method("Empirical IF", "outputs", False),
    "datamodel": Method("Datamodel", "outputs", False),
    # TRAK of the generated image's DDIM trajectory (diffattr.journey): generated queries only
    "journey_trak": Method("Journey-TRAK", "features", True, functions=("simple",), splits=("gen",)),
    # DAS: kernel scores on gradients of the noise predictor's output, weighted by residuals (diffattr.das)
    "das": Method("DAS", "features", True, functions=("avg",)),
}
FEATURE_METHODS = tuple(name for name, method in METHODS.items() if method.inputs == "features")
# Similarity baselines: one job per (baseline, query split) on images or on their CLIP embeddings.
BASELINES = tuple(name for name, method in METHODS.items() if method.inputs in ("pixels", "embeddings"))
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
        name += f" ({'C' if METHODS[method].inputs == 'ensemble' else 'N'}={int(models)})"
    if METHODS[method].inputs == "embeddings" and clip_weights == RANDOM_INIT:
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
                             "embeddings": EMBEDDING_STORE_KEYS}.get(METHODS[method].inputs, ()))
        require_present(keys, (f"{path} (preds/{method})", {**attrs, **array.attrs}),
                        "diffattr's score or baseline")
        lambdas = np.array([np.nan if lam is None else lam for lam in array.attrs["lambdas"]], np.float64)
        out[method] = array[...], lambdas
    return out, attrs
