"""Per-slide k-means reduction of patch embeddings (the seed's MiniBatchKMeans).

Slides with more than `n_clusters` embeddings are clustered with scikit-learn
`MiniBatchKMeans(n_clusters=500, max_iter=600, n_init=10, batch_size=10240)` by default.
Smaller slides keep their embeddings as centroids and labels 0..N-1 (the seed clusters only
slides with more than 500 embeddings). Labels always index the nearest final centroid
(euclidean), computed here rather than taken from the estimator's last mini-batch pass.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.cluster import MiniBatchKMeans


@dataclass(frozen=True)
class KMeansParams:
    """The clustering configuration, recorded in metadata.json."""

    n_clusters: int = 500
    max_iter: int = 600
    n_init: int = 10
    batch_size: int = 10240

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Clustering:
    centroids: np.ndarray  # float32 [K, D]
    labels: np.ndarray  # int64 [N]
    cluster_sizes: np.ndarray  # int64 [K]
    method: str  # "minibatch_kmeans" or "identity" (N <= n_clusters)
    random_state: int | None


def random_state_for(instance_uuid: str) -> int:
    """A seed derived from the slide's UUID, so reruns of one slide are reproducible."""
    return uuid.UUID(instance_uuid).int % (2**31 - 1)


def nearest_centroid(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (euclidean) for every embedding, in blocks."""
    labels = np.empty(len(embeddings), np.int64)
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    for start in range(0, len(embeddings), 8192):
        block = embeddings[start : start + 8192]
        # |e - c|^2 = |e|^2 - 2 e.c + |c|^2; |e|^2 is constant per row.
        labels[start : start + len(block)] = np.argmin(
            c_sq[None, :] - 2 * block @ centroids.T, axis=1
        )
    return labels


def cluster_embeddings(
    embeddings: np.ndarray, params: KMeansParams, random_state: int
) -> Clustering:
    """Reduces one slide's embeddings to at most `params.n_clusters` centroids."""
    embeddings = np.asarray(embeddings, np.float32)
    n = len(embeddings)
    if n == 0:
        raise ValueError("cannot cluster a slide with no embeddings")
    if n <= params.n_clusters:
        return Clustering(
            embeddings.copy(), np.arange(n, dtype=np.int64), np.ones(n, np.int64), "identity", None
        )
    kmeans = MiniBatchKMeans(
        n_clusters=params.n_clusters,
        max_iter=params.max_iter,
        n_init=params.n_init,
        batch_size=params.batch_size,
        random_state=random_state,
    ).fit(embeddings)
    centroids = kmeans.cluster_centers_.astype(np.float32)
    labels = nearest_centroid(embeddings, centroids)
    sizes = np.bincount(labels, minlength=len(centroids)).astype(np.int64)
    return Clustering(centroids, labels, sizes, "minibatch_kmeans", random_state)
