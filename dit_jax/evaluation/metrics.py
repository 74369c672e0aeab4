"""FID, sFID, Inception Score and improved precision/recall, as OpenAI's ADM evaluator
(guided-diffusion `evaluations/evaluator.py`) defines them. See docs/evaluation.md.

- Fréchet distance between Gaussians fitted to Inception features, in float64 with SciPy's
  matrix square root; when the product of the covariances is singular the square root is retried
  with eps·I added to both, and an imaginary part larger than 1e-3 on the diagonal is an error.
  FID uses pool_3 (2048), sFID the 2023 `mixed_6/conv` spatial features.
- Inception Score: softmax of the unbiased logits, exp(mean KL(p(y|x) ‖ p(y))) per split of
  `split_size` = 5000 samples (10 splits for 50K), averaged over splits.
- Improved precision/recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
  around its points whose squared radius is the squared distance to the k-th (k = 3) nearest
  neighbour (the point itself counting as the 0-th). Precision is the fraction of samples inside
  the reference manifold, recall the fraction of references inside the sample manifold. Squared
  distances are computed as ‖u‖² − 2u·v + ‖v‖² clipped at 0, in float16 like the evaluator, in
  float32 for a block whose float16 result overflows.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

IS_SPLIT_SIZE = 5000
NHOOD_SIZE = 3
BLOCK_SIZE = 10000


@dataclasses.dataclass
class FIDStatistics:
    """Mean and covariance of a feature set (float64)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> FIDStatistics:
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"FID statistics need at least 2 feature rows, got shape "
                             f"{features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))

    def frechet_distance(self, other: FIDStatistics, eps: float = 1e-6) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


class RunningStatistics:
    """FIDStatistics accumulated batch by batch (sums and the Gram matrix in float64), so that
    reference sets of any size never hold all their features in memory."""

    def __init__(self):
        self.count = 0
        self.total = None
        self.gram = None

    def update(self, features: np.ndarray):
        x = np.asarray(features, np.float64)
        if self.total is None:
            self.total = np.zeros(x.shape[1])
            self.gram = np.zeros((x.shape[1], x.shape[1]))
        self.count += len(x)
        self.total += x.sum(axis=0)
        self.gram += x.T @ x

    def finalize(self) -> FIDStatistics:
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        mu = self.total / self.count
        sigma = (self.gram - self.count * np.outer(mu, mu)) / (self.count - 1)
        return FIDStatistics(mu, sigma)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1Σ2)^½), float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the product of the covariances is singular; adding {eps} to their "
                      "diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the matrix square root has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # A singular product is detected from the non-finite result, as in the evaluator; SciPy's
    # own warning about it would only repeat that.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = linalg.sqrtm(a)
    return result[0] if isinstance(result, tuple) else result


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def inception_score(logits_unbiased: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score from the unbiased logits (N, 1008): the mean over consecutive splits
    of `split_size` rows of exp(mean_x KL(p(y|x) ‖ mean_x p(y|x)))."""
    preds = softmax(logits_unbiased)
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start:start + split_size]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


# --------------------------------------------------------------------------- precision / recall


def _sq_distances(u, v):
    nu = jnp.sum(jnp.square(u), axis=1)[:, None]
    nv = jnp.sum(jnp.square(v), axis=1)[None, :]
    uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(nu - 2 * uv + nv, 0.0)


@jax.jit
def pairwise_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """Squared distances (float32) between the rows of u and v: in float16 as the evaluator
    computes them, or in float32 where float16 overflows anywhere in the block."""
    d16 = _sq_distances(u.astype(jnp.float16), v.astype(jnp.float16))
    return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32),
                        lambda: _sq_distances(u.astype(jnp.float32), v.astype(jnp.float32)))


@partial(jax.jit, static_argnums=2)
def _smallest(running, block, k):
    """The k smallest values of each row of [running | block], ascending."""
    both = jnp.concatenate([running, block], axis=1)
    return -jax.lax.top_k(-both, k)[0]


def manifold_radii(features: np.ndarray, k: int = NHOOD_SIZE, row_batch_size: int = BLOCK_SIZE,
                   col_batch_size: int = BLOCK_SIZE) -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour in `features`, the point
    itself included as the 0-th (the evaluator's partition at index k), computed block by block
    keeping the k + 1 smallest distances of each row."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images, got {n}")
    radii = np.empty(n, np.float32)
    for r in range(0, n, row_batch_size):
        rows = jnp.asarray(features[r:r + row_batch_size], jnp.float32)
        best = jnp.full((len(rows), 0), jnp.inf, jnp.float32)
        for c in range(0, n, col_batch_size):
            d = pairwise_distances(rows, jnp.asarray(features[c:c + col_batch_size], jnp.float32))
            best = _smallest(best, d, min(k + 1, best.shape[1] + d.shape[1]))
        radii[r:r + len(rows)] = np.asarray(best[:, k])
    return radii


@jax.jit
def _inside(u, radii_u, v, radii_v):
    d = pairwise_distances(u, v)
    u_in_v = jnp.any(d <= radii_v[None, :], axis=1)
    v_in_u = jnp.any(d <= radii_u[:, None], axis=0)
    return u_in_v, v_in_u


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     k: int = NHOOD_SIZE, row_batch_size: int = BLOCK_SIZE,
                     col_batch_size: int = BLOCK_SIZE) -> tuple[float, float]:
    """(precision, recall) of the samples against the references, as the ADM evaluator's
    ManifoldEstimator with nhood_sizes=(k,)."""
    ref_radii = manifold_radii(ref_features, k, row_batch_size, col_batch_size)
    sample_radii = manifold_radii(sample_features, k, row_batch_size, col_batch_size)
    ref_in = np.zeros(len(ref_features), bool)
    sample_in = np.zeros(len(sample_features), bool)
    for r in range(0, len(ref_features), row_batch_size):
        u = jnp.asarray(ref_features[r:r + row_batch_size], jnp.float32)
        for c in range(0, len(sample_features), col_batch_size):
            v = jnp.asarray(sample_features[c:c + col_batch_size], jnp.float32)
            u_in, v_in = _inside(u, jnp.asarray(ref_radii[r:r + len(u)]), v,
                                 jnp.asarray(sample_radii[c:c + len(v)]))
            ref_in[r:r + len(u)] |= np.asarray(u_in)
            sample_in[c:c + len(v)] |= np.asarray(v_in)
    return float(sample_in.mean()), float(ref_in.mean())


__all__ = ["FIDStatistics", "RunningStatistics", "frechet_distance", "inception_score",
           "manifold_radii", "pairwise_distances", "precision_recall", "softmax"]
