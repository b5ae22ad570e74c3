"""Small synthetic vector factories for index tests."""

from __future__ import annotations

import numpy as np


def clustered(n: int, dim: int, n_clusters: int = 50, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    """L2-normalised vectors around random centres: the shape tower outputs have (topics, genres)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    assign = rng.integers(0, n_clusters, n)
    x = centres[assign] + noise * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)
