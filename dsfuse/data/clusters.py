"""Tokens in skewed clusters: the synthetic task `train-moe` trains on.

A few clusters hold most tokens (Zipf frequencies), so a router left alone piles them onto a few
experts; the label of a token is its cluster.
"""

from __future__ import annotations

import numpy as np


def skewed_cluster_tokens(n_seqs: int, seq_len: int, dim: int, n_clusters: int, rng: np.random.Generator,
                          skew: float = 1.2, noise: float = 0.6, centers: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens float32 [n_seqs, seq_len, dim], labels int64 [n_seqs, seq_len], centers [n_clusters, dim]).

    Cluster c is drawn with probability proportional to 1 / (c + 1) ** skew; pass `centers` back in to
    draw a held-out set from the same clusters.
    """
    if centers is None:
        centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    freq = 1.0 / np.arange(1, n_clusters + 1) ** skew
    labels = rng.choice(n_clusters, size=(n_seqs, seq_len), p=freq / freq.sum())
    tokens = centers[labels] + noise * rng.standard_normal((n_seqs, seq_len, dim)).astype(np.float32)
    return tokens.astype(np.float32), labels.astype(np.int64), centers
