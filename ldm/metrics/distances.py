"""FID and KID (Heusel et al. 2017; Bińkowski et al. 2018) between two sets of images, as clean-fid
computes them (Parmar et al. 2022), on the features of ldm/metrics/features.py.

FD = |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½. With Σi = Ai Aiᵀ, the eigenvalues of Σ1 Σ2 are the
squared singular values of A1ᵀ A2, so tr (Σ1 Σ2)^½ is the nuclear norm of A1ᵀ A2: no matrix square root
of a non-symmetric (and, for fewer images than 2048, singular) product, and FID(A, A) is 0 to round-off.
Features give A = (X − μ)ᵀ / √(n − 1) directly (n × n work); a stored Σ is factored by eigh.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .inception import features


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ (d,), Σ (d, d)) in float64, Σ with 1 / (n − 1) as np.cov(rowvar=False)."""
    x = _check_features(feats, "features")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _check_features(feats, name: str) -> np.ndarray:
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: need at least 2 images' features (N, d), got shape {x.shape} "
                         f"(a covariance needs 2; FID is only meaningful with thousands)")
    return x


def _factor_of_features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    if len(x) > x.shape[1]:                                           # more images than features: factor Σ
        return mu, _factor_of_sigma(np.cov(x, rowvar=False))
    return mu, (x - mu).T / np.sqrt(len(x) - 1)                       # Σ = A Aᵀ, A (d, n)


def _factor_of_sigma(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return v * np.sqrt(np.clip(w, 0, None))                           # Σ = A Aᵀ, A (d, d)


def _frechet(mu1, a1, mu2, a2) -> float:
    diff = mu1 - mu2
    tr_sqrt = np.linalg.svd(a1.T @ a2, compute_uv=False).sum()
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * tr_sqrt)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FD between N(μ1, Σ1) and N(μ2, Σ2) (clean-fid's `frechet_distance`, without scipy)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different sizes: μ {mu1.shape} / {mu2.shape}, Σ {sigma1.shape} / "
                         f"{sigma2.shape}")
    return _frechet(mu1, _factor_of_sigma(sigma1), mu2, _factor_of_sigma(sigma2))


def kernel_distance(feats1, feats2, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID: clean-fid's `kernel_distance` — the unbiased MMD² with the polynomial kernel
    k(x, y) = (xᵀy / d + 1)³, averaged over `num_subsets` random subsets of m = min(n1, n2,
    max_subset_size) rows of each set (drawn with np.random.RandomState(seed), so the number is
    reproducible; with m equal to both sizes every subset is the whole set). Raw, not × 1000."""
    y, x = _check_features(feats1, "feats1"), _check_features(feats2, "feats2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features of different widths: {y.shape[1]} and {x.shape[1]}")
    d = x.shape[1]
    m = min(len(x), len(y), max_subset_size)
    rng = np.random.RandomState(seed)
    t = 0.0
    for _ in range(num_subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        a = (xs @ xs.T / d + 1) ** 3 + (ys @ ys.T / d + 1) ** 3
        b = (xs @ ys.T / d + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) from a .npz with arrays `mu` (d,) and `sigma` (d, d) (clean-fid's and pytorch-fid's keys)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except KeyError as e:
        raise ValueError(f"{path}: reference statistics need arrays 'mu' and 'sigma' ({e} is missing)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: can't read it as a .npz of reference statistics ({e})") from None
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} don't fit (want (d,) and (d, d))")
    return mu, sigma


def save_statistics(path, feats: np.ndarray) -> Path:
    """Write (μ, Σ) of `feats` to `path` (.npz) atomically; returns the path."""
    mu, sigma = statistics(feats)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _is_stats(source) -> bool:
    return isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".npz"


def _check_source(source, name: str):
    """Fail on a missing folder or a bad .npz before any Inception work on the other side."""
    if _is_stats(source):
        return load_statistics(source)
    if isinstance(source, (str, Path)):
        from .images import image_files
        image_files(source)
    elif isinstance(source, np.ndarray) or not hasattr(source, "__len__") or len(source) < 2:
        raise TypeError(f"{name}: give a folder of images, a .npz of reference statistics, or a list of "
                        f"at least 2 PIL images")
    return None


def _features(source, name: str, **kw) -> np.ndarray:
    return _check_features(features(source, **kw), f"{name} ({source})" if isinstance(source, (str, Path)) else name)


def fid(a, b, *, device: str = "cpu", batch_size: int = 16, cache: bool = True, progress: bool = True) -> float:
    """FID between a and b: each a folder of images, a list of PIL images, or a .npz of (μ, Σ)."""
    stats = [_check_source(a, "a"), _check_source(b, "b")]
    sides = []
    for source, stat, name in zip((a, b), stats, "ab"):
        if stat is not None:
            sides.append((stat[0], _factor_of_sigma(stat[1])))
        else:
            sides.append(_factor_of_features(_features(source, name, device=device, batch_size=batch_size,
                                                       cache=cache, progress=progress)))
    (mu1, a1), (mu2, a2) = sides
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics of different widths: {mu1.shape[0]} and {mu2.shape[0]}")
    return _frechet(mu1, a1, mu2, a2)


def kid(a, b, *, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0, device: str = "cpu",
        batch_size: int = 16, cache: bool = True, progress: bool = True) -> float:
    """KID between two folders (or lists of PIL images); needs both sides' features, not a .npz."""
    for source, name in ((a, "a"), (b, "b")):
        if _is_stats(source):
            raise ValueError(f"{name}: KID needs every image's features, which a .npz of (mu, sigma) doesn't "
                             f"hold; give the folder of images")
        _check_source(source, name)
    kw = dict(device=device, batch_size=batch_size, cache=cache, progress=progress)
    return kernel_distance(_features(a, "a", **kw), _features(b, "b", **kw), num_subsets, max_subset_size, seed)
