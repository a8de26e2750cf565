"""Linear datamodeling score: Spearman correlation over subsets, bootstrap interval, lambda choice."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .protocol import FeatureSet, ModelName
from .methods import label, read_predictions
from .provenance import (GROUND_TRUTH_KEYS, REQUIRED_GROUND_TRUTH_KEYS, ProvenanceError, require_finite,
                         require_present, require_same)
from .storage import atomic_output, file_sha256, read_member

RULES = ("oracle", "heldout")


def spearman_rows(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman correlation (m,) of pred and truth (m, M) along the subset axis; nan for a constant row."""
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != truth.shape:
        raise ValueError(f"pred and truth must both be (m, M), got {pred.shape} and {truth.shape}")
    return _spearman(pred, truth)


def lds(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of the Spearman correlation, ignoring queries where it is undefined."""
    return float(np.nanmean(spearman_rows(pred, truth)))


def lds_interval(pred, truth, confidence=0.95, n_resamples=1000, seed=0) -> tuple[float, float]:
    """Bootstrap interval of the LDS, resampling subsets (columns); BCa, else percentile if BCa degenerates."""
    pred, truth = _pair(pred, truth)
    return _subset_bootstrap(lambda columns: _resampled_lds(pred, truth, columns), truth.shape,
                             confidence, n_resamples, seed)


def lds_difference_interval(pred_a, pred_b, truth, confidence=0.95, n_resamples=1000,
                            seed=0, truth_b=None) -> tuple[float, float, float]:
    """LDS(a) - LDS(b) and its bootstrap interval, both on the same resampled subsets (a paired
    comparison: the subsets' shared noise cancels, so it can order two methods whose own intervals
    overlap). `truth_b`: b's own truth on the same queries and subsets, for two runs of one design
    that differ in an option (default: `truth` for both)."""
    pred_a, truth = _pair(pred_a, truth)
    if truth_b is not None and np.shape(truth_b) != truth.shape:
        raise ValueError(f"truth_b must be shaped as truth {truth.shape}, got {np.shape(truth_b)}")
    pred_b, truth_b = _pair(pred_b, truth if truth_b is None else truth_b)
    low, high = _subset_bootstrap(
        lambda columns: _resampled_lds(pred_a, truth, columns) - _resampled_lds(pred_b, truth_b, columns),
        truth.shape, confidence, n_resamples, seed)
    return lds(pred_a, truth) - lds(pred_b, truth_b), low, high


def _pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != truth.shape:
        raise ValueError(f"pred and truth must both be (m, M), got {pred.shape} and {truth.shape}")
    return pred, truth


def _resampled_lds(pred: np.ndarray, truth: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The LDS over each resample of subsets: columns (..., M) of indices -> (...)."""
    rho = _spearman(np.moveaxis(pred[:, columns], 0, -2), np.moveaxis(truth[:, columns], 0, -2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # resample where every query is nan
        return np.nanmean(rho, axis=-1)


def _subset_bootstrap(statistic, shape, confidence, n_resamples, seed) -> tuple[float, float]:
    """scipy's bootstrap of statistic(columns) over resamples of the M subsets (columns) of an (m, M)
    matrix; BCa, else percentile where BCa degenerates."""
    m, n_subsets = shape
    batch = max(1, 10_000_000 // (m * n_subsets))  # bound memory: each resample holds (m, M) arrays
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            # a degenerate BCa (e.g. every resample gives the same LDS) returns nan, handled below
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            ci = stats.bootstrap(
                (np.arange(n_subsets),), lambda columns, axis=-1: statistic(np.asarray(columns).astype(np.intp)),
                vectorized=True, axis=-1, batch=batch, n_resamples=n_resamples, confidence_level=confidence,
                method=method, rng=np.random.default_rng(seed),
            ).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            break
    return float(ci.low), float(ci.high)


def select_lambda(preds: np.ndarray, truth: np.ndarray, lambdas, rule: str, heldout_seed: int = 0,
                  confidence: float = 0.95, n_resamples: int = 1000) -> dict:
    """Choose lambda for preds (L, m, M) against truth (m, M) and report the LDS with its interval.

    'oracle' selects and reports on all M subsets (optimistic, as in the paper); 'heldout' selects on a
    random half of the subsets and reports on the other half.
    """
    if rule not in RULES:
        raise ValueError(f"unknown lambda selection rule {rule!r}; allowed: {', '.join(RULES)}")
    preds = np.asarray(preds, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    lambdas = np.asarray(lambdas, dtype=np.float64)
    if preds.ndim != 3 or preds.shape[1:] != truth.shape or preds.shape[0] != len(lambdas):
        raise ValueError(
            f"preds must be (L, m, M) with truth (m, M) and L lambdas; got preds {preds.shape}, "
            f"truth {truth.shape}, {len(lambdas)} lambdas"
        )
    best, report = _choose(preds, truth, rule, heldout_seed)
    pred, target = preds[best][:, report], truth[:, report]
    low, high = lds_interval(pred, target, confidence=confidence, n_resamples=n_resamples)
    return dict(
        lambda_=float(lambdas[best]),
        lds=lds(pred, target),
        ci_low=low,
        ci_high=high,
        n_subsets=len(report),
        n_queries=int(np.isfinite(spearman_rows(pred, target)).sum()),
    )


def _choose(preds: np.ndarray, truth: np.ndarray, rule: str, heldout_seed: int) -> tuple[int, np.ndarray]:
    """The index of the lambda `rule` chooses and the subsets its LDS is reported on."""
    n_subsets = truth.shape[1]
    if rule == "oracle":
        select = report = np.arange(n_subsets)
    else:
        perm = np.random.default_rng(heldout_seed).permutation(n_subsets)
        select, report = perm[: n_subsets // 2], perm[n_subsets // 2:]
    return int(np.nanargmax(lds_per_lambda(preds[:, :, select], truth[:, select]))), report


def oracle_predictions(preds: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """preds (L, m, M) at the oracle lambda against truth (m, M): what a paired comparison of two
    methods' (or two runs') LDS takes (lds_difference_interval)."""
    preds = np.asarray(preds, dtype=np.float64)
    return preds[_choose(preds, np.asarray(truth, dtype=np.float64), "oracle", 0)[0]]


def lds_per_lambda(preds: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(L,) the LDS of each lambda's predictions preds (L, m, M) against truth (m, M), no choice made."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # lambda where every query is nan
        return np.nanmean(_spearman(np.asarray(preds, np.float64), np.asarray(truth, np.float64)), axis=-1)


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis of broadcastable arrays; nan where a side is constant."""
    ra = stats.rankdata(a, axis=-1)
    rb = stats.rankdata(b, axis=-1)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    num = (ra * rb).sum(axis=-1)
    den = np.sqrt((ra * ra).sum(axis=-1) * (rb * rb).sum(axis=-1))
    with np.errstate(invalid="ignore"):  # a constant side has ranks exactly equal to their mean: 0/0
        return num / den


def ground_truth_matrix(truth_paths: dict, split: str, n_subsets: int,
                        subsets_sha256: str | None = None) -> tuple[np.ndarray, dict]:
    """(m, M) truth: each subset's query losses averaged over its training seeds.

    `truth_paths` maps model names s<subset>-r<seed> to ground-truth stores. Returns the matrix and the
    provenance shared by every store (query hash, timesteps, noise seeds), checked to agree. A store
    that records its model's subsets table (`subsets_sha256`) or `subset` must match the table in use
    and its model's name.
    """
    per_model: dict[str, np.ndarray] = {}
    first, models = None, {}
    for name, path in truth_paths.items():
        losses, attrs = read_member(path, split)
        require_present(REQUIRED_GROUND_TRUTH_KEYS, (f"{path} ({split})", attrs), "diffattr's ground_truth")
        if first is None:
            first = (str(path), attrs)
        require_same(GROUND_TRUTH_KEYS, first, (str(path), attrs))
        if attrs["model_sha256"] in models:
            raise ProvenanceError(f"{path} and {models[attrs['model_sha256']]} hold the ground truth of the "
                                  f"same model (model_sha256 {attrs['model_sha256']}), not of {name}'s own")
        models[attrs["model_sha256"]] = path
        if subsets_sha256 is not None and attrs.get("subsets_sha256") not in (None, subsets_sha256):
            raise ProvenanceError(f"{path}: its model was trained on another subsets table "
                                  f"(subsets_sha256 {attrs['subsets_sha256']}, table in use {subsets_sha256})")
        model = ModelName.parse(name)
        if attrs.get("subset") not in (None, model.subset):
            raise ProvenanceError(f"{path}: the ground truth of a model trained on subset {attrs['subset']}, "
                                  f"given as {name}'s")
        if attrs.get("train_seed") not in (None, model.seed):
            raise ProvenanceError(f"{path}: the ground truth of a model trained with seed {attrs['train_seed']}, "
                                  f"given as {name}'s")
        require_finite(f"{path} ({split})", losses)
        per_model[name] = losses
    return subset_means(per_model, n_subsets), first[1]


def subset_means(per_model: dict, n_subsets: int) -> np.ndarray:
    """(m, M): each subset's per-query values averaged over its models' training seeds; `per_model`
    maps model names s<subset>-r<seed> to (m,) arrays."""
    per_subset: dict[int, list[np.ndarray]] = {}
    for name, values in per_model.items():
        per_subset.setdefault(ModelName.parse(name).subset, []).append(values)
    missing = sorted(set(range(n_subsets)) - set(per_subset))
    if missing:
        raise ValueError(f"ground truth is missing for subsets {missing}")
    return np.stack([np.mean(per_subset[j], axis=0) for j in range(n_subsets)], axis=1)


def checkpoint_label(attrs: dict) -> str:
    """The table's `checkpoint` of a predictions store: '' for the final weights (and for stores
    without features), the training step of a kept checkpoint's features, or the steps TracInCP /
    GAS summed over, e.g. '150+300+450+final'."""
    steps = attrs.get("checkpoints", [attrs.get("checkpoint")])
    if steps == [None]:
        return ""
    return "+".join("final" if step is None else str(int(step)) for step in steps)


def lds_table(predictions_path, subsets_path, truth_paths: dict, split: str, spec: dict, out_path,
              curve_path=None) -> None:
    """One row per (method of the store, lambda rule): the chosen lambda (NaN for a method without
    one), the LDS and its bootstrap interval. `curve_path`, when given, gets one row per (method,
    lambda of its grid): the LDS over all subsets at that lambda, no lambda chosen and no interval
    (what a lambda ablation tabulates).

    Refused: scores made with another subsets table than `subsets_path`, and ground truth computed on
    another query set, with other timesteps or noise seeds between models, or for other subsets.
    """
    predictions, attrs = read_predictions(predictions_path)
    table_sha256 = file_sha256(subsets_path)
    if attrs["subsets_sha256"] != table_sha256:
        raise ProvenanceError(f"{predictions_path} was scored with another subsets table than {subsets_path} "
                              f"(subsets_sha256 {attrs['subsets_sha256']} vs {table_sha256})")
    n_subsets = {preds.shape[2] for preds, _ in predictions.values()}
    if len(n_subsets) != 1:
        raise ProvenanceError(f"{predictions_path} holds predictions for {sorted(n_subsets)} subsets; "
                              "expected one count for every method")
    truth, truth_attrs = ground_truth_matrix(truth_paths, split, n_subsets.pop(), table_sha256)
    if truth_attrs["query_sha256"] != attrs["query_sha256"]:
        raise ProvenanceError(f"{predictions_path} and the ground truth ({next(iter(truth_paths.values()))}) "
                              f"were computed on different '{split}' query sets (query_sha256 "
                              f"{attrs['query_sha256']} vs {truth_attrs['query_sha256']})")
    rows, curve = [], []
    for method, (preds, lambdas) in predictions.items():
        keys = {"method": label(method, attrs.get("function"), attrs.get("models"), attrs.get("clip_weights")),
                "function": attrs.get("function"),
                "timesteps": attrs.get("K"), "proj_dim": attrs.get("proj_dim"),
                "checkpoint": checkpoint_label(attrs), "tags": feature_tags(attrs),
                "split": split}
        for rule in spec["lambda_rules"]:
            result = select_lambda(preds, truth, lambdas, rule, int(spec["heldout_seed"]),
                                   float(spec["confidence"]), int(spec["bootstrap_resamples"]))
            rows.append({**keys, "lambda_rule": rule, "lambda": result["lambda_"],
                         "lds": result["lds"], "ci_low": result["ci_low"], "ci_high": result["ci_high"],
                         "n_queries": result["n_queries"], "n_subsets": result["n_subsets"]})
        curve += [{**keys, "lambda": lam, "lds": value}
                  for lam, value in zip(lambdas, lds_per_lambda(preds, truth))]
    with atomic_output(out_path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    if curve_path is not None:
        with atomic_output(curve_path) as tmp:
            pd.DataFrame(curve).to_csv(tmp, index=False)


def feature_tags(attrs: dict) -> str:
    """The scheme and noises tags of a store's feature-set name (protocol.FeatureSet.tags, '' for the
    defaults; the checkpoint has its own column); '' for a store without features."""
    if attrs.get("function") is None:
        return ""
    return FeatureSet(attrs["function"], int(attrs["K"]), int(attrs["proj_dim"]),
                      attrs.get("scheme") or "uniform", int(attrs.get("noises") or 1)).tags
