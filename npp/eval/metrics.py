"""FID, sFID, Inception Score, precision and recall, as the ADM evaluation suite defines them.

Everything is float64 numpy. The matrix square root of the Fréchet distance uses
Tr((Σ1 Σ2)^½) = Σ √λ(Σ1^½ Σ2 Σ1^½), two symmetric eigendecompositions instead of
a general sqrtm: exact for covariance matrices and about 1-2 s for 2048 dimensions
on two cores.
"""

from __future__ import annotations

import numpy as np
import torch

from npp.errors import NppError


class MetricInputError(NppError, ValueError):
    pass


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise MetricInputError(f"need at least 2 feature vectors for a mean and covariance, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1 Σ2)^½)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricInputError(f"feature sizes differ: {mu1.shape} vs {mu2.shape}")
    s1 = _sqrt_psd(sigma1)
    inner = s1 @ sigma2 @ s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


IS_SPLIT = 5000  # ADM's evaluator: consecutive parts of 5,000 samples


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) per consecutive part of `split_size` samples, averaged: ADM's evaluator.

    With N not a multiple of the part size the last part is the remainder (smaller), as
    ADM's loop `for i in range(0, N, 5000)` makes it; N < 5000 is one part. At N = 50,000
    this equals the classic 10 equal splits; at N = 10,000 ADM's 2 parts differ from 10
    equal splits by about 3%.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[0] < 1:
        raise MetricInputError("the Inception Score needs at least one sample")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return float(np.mean([_is_of(logp[i : i + split_size]) for i in range(0, len(logp), split_size)]))


def inception_score_from_probs(probs: np.ndarray, split_size: int = IS_SPLIT) -> float:
    return inception_score(np.log(np.clip(np.asarray(probs, np.float64), 1e-300, None)), split_size)


def _is_of(logp: np.ndarray) -> float:
    p = np.exp(logp)
    log_marginal = np.log(p.mean(axis=0) + 1e-300)
    kl = np.where(p > 0, p * (logp - log_marginal), 0.0).sum(axis=1)  # 0·log 0 = 0
    return float(np.exp(kl.mean()))


def _knn_radii(x: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point."""
    radii = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i : i + chunk], x).pow(2)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    out = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i : i + chunk], centres).pow(2)
        out.append((d <= radii[None, :] + 1e-5).any(dim=1))
    return torch.cat(out)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, device: str | None = None
                     ) -> tuple[float, float]:
    """k-NN manifold precision (fakes inside the real manifold) and recall (reals inside the fake one).

    fp64 distances, on the GPU when there is one (`device` None): 50,000 x 50,000 distances of 2048-d features
    are 10-20 minutes on one CPU core and seconds on a GPU; in fp64 there too, so the comparisons at each
    k-th radius come out as the CPU's."""
    for name, f in (("reference", real), ("sample", fake)):
        if len(f) <= k:
            raise MetricInputError(f"precision/recall with k={k} needs more than {k} {name} features, got {len(f)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    r = torch.from_numpy(np.asarray(real, np.float64)).to(device)
    f = torch.from_numpy(np.asarray(fake, np.float64)).to(device)
    precision = _covered(f, r, _knn_radii(r, k)).double().mean().item()
    recall = _covered(r, f, _knn_radii(f, k)).double().mean().item()
    return precision, recall
