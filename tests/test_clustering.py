import dataclasses

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from transforms.clustering import (
    SEED_PARAMS,
    KMeansParams,
    cluster_embeddings,
    inertia_of,
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


def _gaussian_clusters(n: int, dim: int, true_clusters: int, seed: int) -> np.ndarray:
    """Clusters of uneven size and spread (a fixed dataset for each seed), as in the benchmark."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(true_clusters, dim)).astype(np.float32)
    which = rng.choice(true_clusters, n, p=rng.dirichlet(np.full(true_clusters, 2.0)))
    spread = rng.uniform(0.3, 0.8, true_clusters).astype(np.float32)[which, None]
    noise = rng.normal(size=(n, dim)).astype(np.float32)
    return (centers[which] + noise * spread).astype(np.float32)


@pytest.mark.parametrize(
    "params",
    [
        KMeansParams(n_clusters=12, max_iter=50, n_init=2),
        KMeansParams(
            method="minibatch_kmeans",
            n_clusters=12,
            minibatch_max_iter=50,
            minibatch_n_init=2,
            minibatch_batch_size=256,
        ),
    ],
    ids=["lloyd", "minibatch_kmeans"],
)
def test_large_slide_is_clustered_with_nearest_centroid_labels(params):
    rng = np.random.default_rng(2)
    centers = rng.normal(scale=5, size=(12, 16))
    emb = (centers[rng.integers(0, 12, 900)] + rng.normal(size=(900, 16))).astype(np.float32)
    result = cluster_embeddings(emb, params, random_state_for(UUID))
    assert result.method == params.method
    assert result.centroids.shape == (12, 16) and result.centroids.dtype == np.float32
    distances = ((emb[:, None, :] - result.centroids[None]) ** 2).sum(-1)
    assert np.array_equal(result.labels, distances.argmin(1))
    assert np.array_equal(result.cluster_sizes, np.bincount(result.labels, minlength=12))
    again = cluster_embeddings(emb, params, random_state_for(UUID))
    assert np.array_equal(again.centroids, result.centroids)  # seeded by the UUID


@pytest.mark.parametrize("data_seed", [1, 2])
def test_lloyd_reaches_the_seed_configuration_inertia_on_fixed_data(data_seed):
    """384-d embeddings, more centroids than true clusters (as 500 centroids per slide): the
    default method's inertia is within 0.5% of the seed's MiniBatchKMeans (lower, here).

    On data where one k-means run can settle in a visibly worse local optimum (many
    well-separated clusters, about as many as centroids), single runs vary by ~2% with the
    random state and the seed's best of 10 inits can be lower; `n_init` buys the same there."""
    emb = _gaussian_clusters(3000, 384, 60, seed=data_seed)
    fast = cluster_embeddings(emb, KMeansParams(n_clusters=100), 12345)
    seed = cluster_embeddings(emb, dataclasses.replace(SEED_PARAMS, n_clusters=100), 12345)
    assert fast.method == "lloyd" and seed.method == "minibatch_kmeans"
    assert inertia_of(emb, fast.centroids) <= 1.005 * inertia_of(emb, seed.centroids)
    direct = cdist(emb, fast.centroids, "sqeuclidean").argmin(1)
    assert np.array_equal(fast.labels, direct)


def test_lloyd_is_reproducible_and_seeded_by_the_uuid():
    emb = _gaussian_clusters(2000, 32, 30, seed=3)
    params = KMeansParams(n_clusters=40, init_size=500)  # seeding on a sample of 500
    one = cluster_embeddings(emb, params, random_state_for(UUID))
    two = cluster_embeddings(emb, params, random_state_for(UUID))
    other = cluster_embeddings(emb, params, random_state_for(UUID.replace("0b", "1b", 1)))
    assert np.array_equal(one.centroids, two.centroids)
    assert np.array_equal(one.labels, two.labels)
    assert not np.array_equal(one.centroids, other.centroids)
    assert one.random_state == random_state_for(UUID)


def test_lloyd_fills_every_cluster_when_points_repeat():
    """Fewer distinct points than clusters leaves clusters empty; they take the farthest
    points, so every centroid is a real point and labels still index the nearest one."""
    emb = np.repeat(_gaussian_clusters(300, 8, 5, seed=4), 3, axis=0)
    result = cluster_embeddings(emb, KMeansParams(n_clusters=320), 1)
    assert result.centroids.shape == (320, 8) and np.isfinite(result.centroids).all()
    direct = ((emb[:, None, :] - result.centroids[None]) ** 2).sum(-1)
    assert np.allclose(direct.min(1), direct[np.arange(len(emb)), result.labels])


def test_seed_configuration_is_the_published_one():
    assert SEED_PARAMS.method == "minibatch_kmeans"
    assert (
        SEED_PARAMS.n_clusters,
        SEED_PARAMS.minibatch_max_iter,
        SEED_PARAMS.minibatch_n_init,
        SEED_PARAMS.minibatch_batch_size,
    ) == (500, 600, 10, 10240)


@pytest.mark.parametrize("bad", [{"method": "kmeans"}, {"n_clusters": 0}, {"max_iter": 0}])
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        KMeansParams(**bad)


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
