"""The ADM evaluation suite over image sets: reference batches and the five numbers.

A reference batch is ADM's .npz format (`VIRTUAL_imagenet256_labeled.npz`): `mu`, `sigma` (pool_3
statistics), `mu_s`, `sigma_s` (spatial statistics) and `arr_0`, uint8 images whose features
give the reference manifold of precision/recall (10K images in ADM's). Statistics found in the
file are used as they are (ADM computed ImageNet's over the whole training set); otherwise they
are computed from `arr_0`, as the evaluator does for a sample batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterable

import jax
import numpy as np
from tqdm import tqdm

from dit_jax.evaluation.extract import FeatureExtractor
from dit_jax.evaluation.images import IMAGES_KEY, ImageSet
from dit_jax.evaluation.inception import load_inception
from dit_jax.evaluation.metrics import (FIDStatistics, RunningStatistics, inception_score,
                                        precision_recall)

log = logging.getLogger(__name__)

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


@dataclasses.dataclass
class SetFeatures:
    """What the suite needs of one image set: pool_3 statistics, spatial statistics, and (when
    its images are at hand) the pool_3 features and unbiased logits of every image."""

    stats: FIDStatistics
    spatial_stats: FIDStatistics
    pool_3: np.ndarray | None = None
    logits_unbiased: np.ndarray | None = None
    count: int = 0


def features_of(batches: Iterable[np.ndarray], extractor: FeatureExtractor, *,
                keep: bool = True, progress=None) -> SetFeatures:
    """Statistics of a stream of uint8 image batches; keep=True also keeps per-image pool_3 and
    unbiased logits (precision/recall and IS)."""
    pool_stats, spatial_stats = RunningStatistics(), RunningStatistics()
    pools, logits = [], []
    for images in batches:
        out = extractor(images)
        pool_stats.update(out["pool_3"])
        spatial_stats.update(out["spatial"])
        if keep:
            pools.append(out["pool_3"])
            logits.append(out["logits_unbiased"])
        if progress is not None:
            progress.update(len(images))
    return SetFeatures(pool_stats.finalize(), spatial_stats.finalize(),
                       np.concatenate(pools) if keep else None,
                       np.concatenate(logits) if keep else None, pool_stats.count)


def _stats_in(path: Path) -> dict[str, np.ndarray] | None:
    if path.is_dir() or path.suffix != ".npz":
        return None
    with np.load(path) as data:
        present = [k for k in STAT_KEYS if k in data.files]
        if not present:
            return None
        if len(present) < len(STAT_KEYS):
            raise ValueError(f"{path} holds {', '.join(present)} but not all of "
                             f"{', '.join(STAT_KEYS)}; an ADM reference batch has the four")
        has_images = IMAGES_KEY in data.files
        return {**{k: data[k] for k in STAT_KEYS}, "has_images": has_images}


def read_set(path: str | os.PathLike, extractor: FeatureExtractor, *,
             image_size: int | None = None, progress=None, per_image: bool = True) -> SetFeatures:
    """Features of an image set: an ADM-format .npz (precomputed statistics used when present,
    its `arr_0` images giving the precision/recall features) or an image folder.
    per_image=False: statistics only (FID/sFID), the stored ones read without touching arr_0."""
    path = Path(path).expanduser()
    stored = _stats_in(path)
    if stored is not None:
        stats = FIDStatistics(stored["mu"].astype(np.float64), stored["sigma"].astype(np.float64))
        spatial = FIDStatistics(stored["mu_s"].astype(np.float64),
                                stored["sigma_s"].astype(np.float64))
        if not per_image:
            return SetFeatures(stats, spatial)
        if not stored["has_images"]:
            log.warning("%s has statistics but no %s images: precision and recall need them",
                        path, IMAGES_KEY)
            return SetFeatures(stats, spatial)
        images = ImageSet(str(path))
        computed = features_of(images.batches(extractor.batch_size), extractor,
                               progress=progress)
        return dataclasses.replace(computed, stats=stats, spatial_stats=spatial)
    images = ImageSet(str(path), image_size)
    return features_of(images.batches(extractor.batch_size), extractor, keep=per_image,
                       progress=progress)


def compute_metrics(ref: SetFeatures, samples: SetFeatures) -> dict[str, float | None]:
    """fid, sfid, inception_score (of the samples), precision, recall (None without the
    reference images)."""
    result = {
        "fid": samples.stats.frechet_distance(ref.stats),
        "sfid": samples.spatial_stats.frechet_distance(ref.spatial_stats),
        "inception_score": inception_score(samples.logits_unbiased),
        "precision": None, "recall": None,
    }
    if ref.pool_3 is not None:
        result["precision"], result["recall"] = precision_recall(ref.pool_3, samples.pool_3)
    return result


def evaluate_files(ref: str | os.PathLike, samples: str | os.PathLike, *,
                   extractor: FeatureExtractor | None = None,
                   inception_weights: str | os.PathLike | None = None, batch_size: int = 64,
                   image_size: int | None = None, progress: bool = False
                   ) -> tuple[dict[str, float | None], SetFeatures]:
    """The five numbers of the image set `samples` against `ref` (paths as `read_set` takes
    them), and the samples' features. Builds the extractor over every device when none is
    given."""
    if extractor is None:
        extractor = FeatureExtractor(load_inception(inception_weights), batch_size=batch_size)
    show = progress and jax.process_index() == 0
    sets = []
    for what, path in (("reference", ref), ("samples", samples)):
        with tqdm(desc=f"{what} {path}", unit="img", disable=not show) as bar:
            sets.append(read_set(path, extractor, image_size=image_size, progress=bar))
    return compute_metrics(*sets), sets[1]


def format_metrics(results: dict[str, float | None]) -> str:
    """The evaluator's printout: one "Name: value" line per metric."""
    names = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID",
             "precision": "Precision", "recall": "Recall"}
    return "\n".join(f"{name}: {'n/a' if results[key] is None else results[key]}"
                     for key, name in names.items())


def write_reference(out: str | os.PathLike, source: str | os.PathLike,
                    extractor: FeatureExtractor, *, image_size: int | None = None,
                    num_images: int = 10000, seed: int = 0, progress=None) -> Path:
    """An ADM-format reference batch from an image folder or .npz: statistics over every image,
    and `num_images` of them (drawn at random with `seed`, kept in order) as `arr_0`."""
    images = ImageSet(str(source), image_size)
    keep = np.zeros(len(images), bool)
    chosen = np.random.default_rng(seed).permutation(len(images))[:num_images]
    keep[chosen] = True
    kept: list[np.ndarray] = []

    def batches():
        start = 0
        for batch in images.batches(extractor.batch_size):
            kept.append(batch[keep[start:start + len(batch)]])
            start += len(batch)
            yield batch

    feats = features_of(batches(), extractor, keep=False, progress=progress)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, arr_0=np.concatenate(kept), mu=feats.stats.mu, sigma=feats.stats.sigma,
             mu_s=feats.spatial_stats.mu, sigma_s=feats.spatial_stats.sigma)
    return out


__all__ = ["METRICS", "SetFeatures", "compute_metrics", "evaluate_files", "features_of",
           "format_metrics", "read_set", "write_reference"]
