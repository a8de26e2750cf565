"""Raw-pixel baselines: scores from dot products or cosines of flattened images, train vs queries.

The protocol's baseline for pixel-space models. A latent model (Stable Diffusion) would compare
VAE latents instead; that needs the model layer's `latents()` and is not built yet.
"""
from __future__ import annotations

import numpy as np

from .data import load_images
from .methods import BASELINES, write_predictions
from .provenance import ProvenanceError, require_finite
from .score import method_predictions, read_masks
from .storage import array_sha256, file_sha256


def baseline_split(train_path, query_path, subsets_path, baseline: str, out_path) -> None:
    """Subset predictions (1, m, M) of one pixel baseline, with the hashes of both image sets and of
    the subsets table."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {', '.join(BASELINES)}")
    train, query = load_images(train_path), load_images(query_path)
    if train.shape[1:] != query.shape[1:]:
        raise ProvenanceError(f"{train_path} holds images of shape {train.shape[1:]}, but {query_path} "
                              f"holds images of shape {query.shape[1:]}: they cannot be compared pixel by pixel")
    for path, images in ((train_path, train), (query_path, query)):
        require_finite(str(path), images)
    masks = read_masks(subsets_path, len(train), train_path, rows="")
    preds, lambdas = method_predictions(baseline, train.reshape(len(train), -1), query.reshape(len(query), -1),
                                        masks, None)
    write_predictions(out_path, {baseline: (preds, lambdas)},
                      {"train_sha256": array_sha256(train), "query_sha256": array_sha256(query),
                       "subsets_sha256": file_sha256(subsets_path)})
