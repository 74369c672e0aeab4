"""Evaluation as OpenAI's ADM evaluator does it, in JAX: the FID Inception-v3, FID, sFID,
Inception Score, improved precision/recall, and ADM-format reference batches.
See docs/evaluation.md."""

from dit_jax.evaluation.extract import FeatureExtractor
from dit_jax.evaluation.inception import (FID_WEIGHTS_FILE, FID_WEIGHTS_URL, FIDInceptionV3,
                                          from_state_dict, load_inception, resolve_weights)
from dit_jax.evaluation.metrics import (FIDStatistics, frechet_distance, inception_score,
                                        precision_recall)
from dit_jax.evaluation.suite import compute_metrics, read_set, write_reference

__all__ = ["FID_WEIGHTS_FILE", "FID_WEIGHTS_URL", "FIDInceptionV3", "FIDStatistics",
           "FeatureExtractor", "compute_metrics", "frechet_distance", "from_state_dict",
           "inception_score", "load_inception", "precision_recall", "read_set",
           "resolve_weights", "write_reference"]
