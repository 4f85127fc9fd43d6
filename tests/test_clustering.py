import numpy as np
import pytest

from transforms.clustering import (
    KMeansParams,
    cluster_embeddings,
    nearest_centroid,
    random_state_for,
)

UUID = "0b7c5a56-8d3e-4c51-9f5e-2f0d1c8a9b10"


def test_small_slide_keeps_embeddings_as_centroids():
    emb = np.random.default_rng(1).normal(size=(500, 384)).astype(np.float32)
    result = cluster_embeddings(emb, KMeansParams(), random_state_for(UUID))
    assert result.method == "identity"
    assert np.array_equal(result.centroids, emb)
    assert result.labels.tolist() == list(range(500))
    assert result.cluster_sizes.sum() == 500


def test_large_slide_is_clustered_with_nearest_centroid_labels():
    rng = np.random.default_rng(2)
    centers = rng.normal(scale=5, size=(12, 16))
    emb = (centers[rng.integers(0, 12, 900)] + rng.normal(size=(900, 16))).astype(np.float32)
    params = KMeansParams(n_clusters=12, max_iter=50, n_init=2, batch_size=256)
    result = cluster_embeddings(emb, params, random_state_for(UUID))
    assert result.method == "minibatch_kmeans"
    assert result.centroids.shape == (12, 16) and result.centroids.dtype == np.float32
    distances = ((emb[:, None, :] - result.centroids[None]) ** 2).sum(-1)
    assert np.array_equal(result.labels, distances.argmin(1))
    assert np.array_equal(result.cluster_sizes, np.bincount(result.labels, minlength=12))
    again = cluster_embeddings(emb, params, random_state_for(UUID))
    assert np.array_equal(again.centroids, result.centroids)  # seeded by the UUID


def test_nearest_centroid_in_blocks_matches_direct():
    rng = np.random.default_rng(3)
    emb, cents = rng.normal(size=(20000, 8)), rng.normal(size=(30, 8))
    direct = ((emb[:, None] - cents[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(nearest_centroid(emb, cents), direct)


def test_random_state_is_a_valid_seed_and_depends_on_uuid():
    assert 0 <= random_state_for(UUID) < 2**31
    assert random_state_for(UUID) != random_state_for("1b7c5a56-8d3e-4c51-9f5e-2f0d1c8a9b10")


def test_empty_slide_is_an_error():
    with pytest.raises(ValueError):
        cluster_embeddings(np.zeros((0, 384), np.float32), KMeansParams(), 0)
