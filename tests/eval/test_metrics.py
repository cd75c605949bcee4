import numpy as np
import pytest

from npp.eval.metrics import (
    MetricInputError,
    frechet_distance,
    gaussian_stats,
    inception_score,
    inception_score_from_probs,
    precision_recall,
)


def test_frechet_distance_closed_form_for_commuting_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # ‖Δμ‖² + Σ(√a − √b)²
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_a_float64_numpy_reference():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    (m1, s1), (m2, s2) = gaussian_stats(x), gaussian_stats(y)
    # reference: the general (non-symmetric) square root of Σ1Σ2 through its eigenvalues
    eig = np.linalg.eigvals(s1 @ s2)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.astype(complex)).real.sum()
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)


def test_inception_score_on_constructed_tables():
    confident = np.eye(10)[np.tile(np.arange(10), 20)]  # every class equally often, each sample certain
    assert inception_score_from_probs(confident, split_size=20) == pytest.approx(10.0, rel=1e-9)
    uniform = np.full((100, 10), 0.1)
    assert inception_score_from_probs(uniform) == pytest.approx(1.0)
    one_class = np.eye(10)[np.zeros(100, int)]
    assert inception_score_from_probs(one_class) == pytest.approx(1.0)
    # two classes, each sample 0.75/0.25 towards its class: KL = 0.75 ln 1.5 + 0.25 ln 0.5
    p = np.array([[0.75, 0.25], [0.25, 0.75]] * 50)
    assert inception_score_from_probs(p) == pytest.approx(np.exp(0.75 * np.log(1.5) + 0.25 * np.log(0.5)))
    with np.errstate(divide="ignore"):
        assert inception_score(np.log(confident), split_size=20) == pytest.approx(10.0, rel=1e-9)
    with pytest.raises(MetricInputError, match="at least one sample"):
        inception_score(np.zeros((0, 3)))


def _adm_inception_score(preds: np.ndarray, split_size: int = 5000) -> float:
    """A transcription of ADM's evaluator (guided-diffusion evaluations/evaluator.py, compute_inception_score)."""
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def test_inception_score_as_adm_computes_it():
    rng = np.random.default_rng(0)
    for n in (10_000, 12_345, 3_000):  # two parts; a smaller last part; one part
        logits = rng.normal(0, 3, (n, 1008)) + np.where(rng.random((n, 1)) < 0.5, 0, 2) * rng.normal(0, 1, (1, 1008))
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        assert inception_score(logits) == pytest.approx(_adm_inception_score(probs), rel=1e-9), n
        if n == 10_000:  # ten equal splits of 1,000 (the classic recipe) give another number here
            ten = np.mean([_adm_inception_score(part, len(part)) for part in np.array_split(probs, 10)])
            assert abs(ten - inception_score(logits)) > 1e-3 * ten


def test_precision_and_recall_on_constructed_sets():
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    assert precision_recall(grid, grid.copy(), k=3) == (1.0, 1.0)
    far = grid + 1000
    assert precision_recall(grid, far, k=3) == (0.0, 0.0)
    # fakes: half on the real grid, half far away → precision 0.5; they cover every real point → recall 1
    half = np.concatenate([grid, far])
    precision, recall = precision_recall(grid, half, k=3)
    assert precision == 0.5 and recall == pytest.approx(1.0)
    # fakes cover only the left half of the reals (a mode dropped): their 3-NN radius is 1, so the reals
    # of columns 0-4 and the next column 5 are covered → recall 0.6, precision 1
    left = grid[grid[:, 0] < 5]
    assert precision_recall(grid, left, k=3) == (1.0, 0.6)
    with pytest.raises(MetricInputError, match="more than 3 sample"):
        precision_recall(grid, grid[:3])
