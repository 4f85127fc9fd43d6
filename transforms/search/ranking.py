"""Slide similarity search: which archive slides look like this one (DESIGN.md §5, the seed).

Semantics, the same for every backend: each query embedding (one centroid of the query slide)
finds its `top_k` archive rows by cosine similarity, leaving out the query's own study unless
asked; the hits are aggregated per (StudyInstanceUID, SeriesInstanceUID) by the sum (default)
or the max of similarity; the best `limit` slides come back with their identity, collection and
thumbnail. Ties break by instance UUID and centroid index, then by Study/Series UID, so results
do not depend on file order.

Backends:
- exact: numpy over the local Parquet search table, streamed in blocks (memory ~ queries x
  block), each slide's newest run only (access.search_table_batches);
- approximate: a faiss IVF index over the same rows, for large local tables; its recall@k
  against exact search is measured when it is built and kept with it;
- BigQuery: VECTOR_SEARCH through transforms/sql/search.sql, built here as SQL plus query
  parameters (bigquery_search_job) so it can be checked without credentials.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import bigquery
from transforms.outputs.archive import (
    PUBLIC_OUTPUT_ROOT,
    PUBLISHED_RESOURCE_TABLE,
    embedding_matrix,
    find_resource,
    newest_resources,
    search_table_batches,
    slide_centroids,
    table_files,
)
from transforms.outputs.layout import ArtifactPaths, table_dir

_LOG = logging.getLogger(__name__)

AGGREGATES = ("sum", "max")
PUBLISHED_SEARCH_TABLE = "hai-cd3-foundations.idc_metadata.path_foundation_500_embeddings"
IDC_METADATA_TABLE = "bigquery-public-data.idc_current.dicom_all"
INDEX_FILE = "search_index/ivf.npz"  # under {output_root}/tables/, beside the tables it indexes
# Similarities are ranked at this many decimals: the same centroid stored under two slides
# (a copy) must tie exactly and fall to the UUID tie-break, whatever the BLAS blocking did to
# the last bits of each dot product.
_TIE_DECIMALS = 9
# Training points per IVF list: faiss' k-means wants at least 39 (training dominates build time).
_TRAIN_PER_LIST = 40
# An approximate hit counts for recall when it is as similar as the exact k-th hit; float32
# similarities from the index differ from exact float64 ones by up to ~1e-6.
_RECALL_TOLERANCE = 1e-5


@dataclass(frozen=True)
class SearchParams:
    """How to search: hits per query embedding, slides returned, aggregation, own study."""

    top_k: int = 20
    limit: int = 100
    aggregate: str = "sum"
    include_own_study: bool = False

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.top_k < 1 or self.limit < 1:
            raise ValueError("top_k and limit must be at least 1")


@dataclass(frozen=True)
class SlideQuery:
    """The slide to search with: its centroids (one query embedding each) and its identity."""

    # float [m, D]; None when the search reads them where it runs (an archive slide in BigQuery)
    centroids: np.ndarray | None
    instance_uuid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    thumbnail_uri: str | None = None

    def __repr__(self) -> str:
        count = "?" if self.centroids is None else len(self.centroids)
        return f"SlideQuery({self.instance_uuid}, study={self.study_instance_uid}, {count})"

    def excluded_study(self, params: SearchParams) -> str | None:
        return None if params.include_own_study else self.study_instance_uid


@dataclass(frozen=True)
class SlideMatch:
    """One archive slide (series) found by a search, best first."""

    rank: int
    score: float  # sum (or max) of cosine similarity over its hits
    hits: int  # (query embedding, archive row) pairs that matched this slide
    study_instance_uid: str
    series_instance_uid: str
    instance_uuid: str | None
    collection: str | None = None
    protocol: str | None = None
    thumbnail_uri: str | None = None
    # The source images' license and DOI (resource table; None where not recorded). Search
    # results are derived from them: attribution travels with every hit.
    source_license: str | None = None
    source_doi: str | None = None


@dataclass(frozen=True)
class Hits:
    """Top archive rows per query embedding, flat: entry i pairs query_index[i] with a row."""

    query_index: np.ndarray  # int [n]
    slide: np.ndarray  # int [n]: row of the slides table (newest resources, sorted by UUID)
    centroid_index: np.ndarray  # int [n]
    similarity: np.ndarray  # float64 [n], cosine similarity

    @classmethod
    def empty(cls) -> Hits:
        none = np.zeros(0, np.int64)
        return cls(none, none, none, np.zeros(0))

    def take(self, rows: np.ndarray) -> Hits:
        return Hits(
            self.query_index[rows], self.slide[rows], self.centroid_index[rows],
            self.similarity[rows],
        )  # fmt: skip

    @classmethod
    def concat(cls, parts: Iterable[Hits]) -> Hits:
        parts = list(parts)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _HIT_FIELDS))


_HIT_FIELDS = ("query_index", "slide", "centroid_index", "similarity")


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (all-zero rows stay zero: similarity 0 to everything)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def first_k_per_query(hits: Hits, k: int) -> Hits:
    """The best k hits of each query embedding: similarity, then instance UUID, centroid index.

    Slide numbers follow UUID order (the slides table is sorted by instance_uuid), so the
    tie-break is by UUID.
    """
    ranked = np.round(hits.similarity, _TIE_DECIMALS)
    order = np.lexsort((hits.centroid_index, hits.slide, -ranked, hits.query_index))
    query = hits.query_index[order]
    first_of_query = np.searchsorted(query, query, side="left")
    return hits.take(order[np.arange(len(order)) - first_of_query < k])


class _RunningTopK:
    """Each query embedding's best k rows so far, merged block by block."""

    def __init__(self, k: int):
        self._k = k
        self.best = Hits.empty()

    def merge(self, similarity: np.ndarray, slide: np.ndarray, centroid_index: np.ndarray) -> None:
        """Adds one block: similarity [m, b] of every query embedding to the block's b rows."""
        m, b = similarity.shape
        ranked = np.round(similarity, _TIE_DECIMALS)
        if b > self._k:
            # Candidates are the rows at least as similar as the k-th best of this block,
            # ties included, so the tie-break sees every tied row.
            kth = np.partition(ranked, b - self._k, axis=1)[:, b - self._k]
            query, row = np.nonzero(ranked >= kth[:, None])
        else:
            query, row = np.divmod(np.arange(m * b), b)
        block = Hits(query, slide[row], centroid_index[row], similarity[query, row])
        self.best = first_k_per_query(Hits.concat([self.best, block]), self._k)


def exact_hits(
    batches: Iterable[pa.RecordBatch],
    slides: pa.Table,
    centroids: np.ndarray,
    top_k: int,
    excluded_study: str | None,
) -> Hits:
    """Exact top_k rows per query embedding over search-table blocks, by cosine similarity."""
    queries = unit_rows(np.asarray(centroids, np.float64))
    best = _RunningTopK(top_k)
    uuids = slides["instance_uuid"]
    for batch in batches:
        if excluded_study is not None:
            batch = batch.filter(pc.not_equal(batch["StudyInstanceUID"], excluded_study))
        if batch.num_rows == 0:
            continue
        rows = embedding_matrix(batch["embedding"])
        if rows.shape[1] != queries.shape[1]:
            raise ValueError(
                f"the search table holds {rows.shape[1]}-value embeddings, the query "
                f"{queries.shape[1]}: they come from different models"
            )
        slide = pc.index_in(batch["instance_uuid"], value_set=uuids).to_numpy()
        centroid_index = batch["centroid_index"].to_numpy()
        best.merge(queries @ unit_rows(rows).T, slide, centroid_index)
    return best.best


def rank_slides(hits: Hits, slides: pa.Table, params: SearchParams) -> list[SlideMatch]:
    """Hits aggregated per (study, series), best `params.limit` first, with slide metadata."""
    studies = slides["StudyInstanceUID"].to_pylist()
    series = slides["SeriesInstanceUID"].to_pylist()
    keys: dict[tuple[str, str], int] = {}
    series_of_slide = np.array(
        [keys.setdefault(key, len(keys)) for key in zip(studies, series, strict=True)], np.int64
    )
    # One series is one slide (slides.py); should a series hold several, its first by UUID
    # stands for it.
    _, representative = np.unique(series_of_slide, return_index=True)
    by_series = series_of_slide[hits.slide]
    counts = np.bincount(by_series, minlength=len(keys))
    if params.aggregate == "sum":
        scores = np.bincount(by_series, weights=hits.similarity, minlength=len(keys))
    else:
        scores = np.full(len(keys), -np.inf)
        np.maximum.at(scores, by_series, hits.similarity)
    key_of = list(keys)
    found = sorted(
        np.nonzero(counts)[0],
        key=lambda s: (-round(float(scores[s]), _TIE_DECIMALS), key_of[s]),
    )[: params.limit]
    columns = {
        name: slides[name].to_pylist() if name in slides.column_names else [None] * len(slides)
        for name in ("instance_uuid", "collection", "thumbnail_uri", "source_license", "source_doi")
    }
    matches = []
    for rank, s in enumerate(found, start=1):
        slide = representative[s]
        matches.append(
            SlideMatch(
                rank=rank,
                score=float(scores[s]),
                hits=int(counts[s]),
                study_instance_uid=key_of[s][0],
                series_instance_uid=key_of[s][1],
                instance_uuid=columns["instance_uuid"][slide],
                collection=columns["collection"][slide],
                thumbnail_uri=columns["thumbnail_uri"][slide],
                source_license=columns["source_license"][slide],
                source_doi=columns["source_doi"][slide],
            )
        )
    return matches


def archive_query(
    output_root: str, resources: pa.Table | None = None, **slide: str | None
) -> SlideQuery:
    """The query for a slide already in the local archive (by instance_uuid=, or
    study_instance_uid= and series_instance_uid=): its centroids from the search table."""
    if resources is None:
        resources = newest_resources(output_root)
    row = find_resource(output_root, resources=resources, **slide)
    return SlideQuery(
        centroids=slide_centroids(output_root, row),
        instance_uuid=row["instance_uuid"],
        study_instance_uid=row["StudyInstanceUID"],
        series_instance_uid=row["SeriesInstanceUID"],
        thumbnail_uri=row["thumbnail_uri"],
    )


def check_same_model(query_model: tuple[str, str], resources: pa.Table, output_root: str) -> None:
    """Raises ValueError unless the archive was embedded with the query's (model, version)."""
    archive = set(
        zip(
            resources["model_name"].to_pylist(), resources["model_version"].to_pylist(), strict=True
        )
    )
    if query_model not in archive:
        names = ", ".join(f"{name} ({version})" for name, version in sorted(archive))
        raise ValueError(
            f"the archive at {output_root} was embedded with {names}, the query slide with "
            f"{query_model[0]} ({query_model[1]}): embeddings of different models are not "
            f"comparable; rerun the query with --model {sorted(archive)[0][0]}"
        )
    if len(archive) > 1:
        _LOG.warning("the archive at %s mixes models: %s", output_root, sorted(archive))


def exact_search(
    output_root: str,
    query: SlideQuery,
    params: SearchParams,
    *,
    resources: pa.Table | None = None,
    block_rows: int = 8192,
) -> list[SlideMatch]:
    """Exact search over {output_root}/tables/search/*.parquet, streamed in blocks."""
    if resources is None:
        resources = newest_resources(output_root)
    batches = search_table_batches(output_root, resources, block_rows)
    hits = exact_hits(
        batches, resources, query.centroids, params.top_k, query.excluded_study(params)
    )
    return rank_slides(hits, resources, params)


@dataclass
class SearchIndex:
    """A faiss IVF index (inner product on unit rows = cosine) over the local search table."""

    ivf: Any  # faiss.IndexIVFFlat
    slides: pa.Table  # newest resource rows at build time, sorted by instance_uuid
    slide: np.ndarray  # int32 [N]: index id -> row of `slides`
    centroid_index: np.ndarray  # int32 [N]
    built_from: dict[str, int]  # {table file name: size in bytes} it was built from
    info: dict[str, Any] = field(default_factory=dict)  # nlist, nprobe, recall

    def hits(
        self, centroids: np.ndarray, top_k: int, excluded_study: str | None, nprobe: int
    ) -> Hits:
        import faiss

        queries = unit_rows(np.asarray(centroids, np.float64)).astype(np.float32)
        search = faiss.SearchParametersIVF(nprobe=nprobe)
        if excluded_study is not None:
            excluded = pc.equal(self.slides["StudyInstanceUID"], excluded_study).to_numpy(
                zero_copy_only=False
            )
            # faiss holds raw pointers: both selectors must stay referenced during the search.
            own_study = faiss.IDSelectorBatch(np.nonzero(excluded[self.slide])[0].astype(np.int64))
            others = faiss.IDSelectorNot(own_study)
            search = faiss.SearchParametersIVF(nprobe=nprobe, sel=others)
        similarity, ids = self.ivf.search(queries, top_k, params=search)
        query, rank = np.nonzero(ids >= 0)  # -1: fewer than top_k rows in the probed lists
        found = ids[query, rank]
        return Hits(
            query.astype(np.int64), self.slide[found].astype(np.int64),
            self.centroid_index[found].astype(np.int64),
            similarity[query, rank].astype(np.float64),
        )  # fmt: skip

    def save(self, output_root: str) -> str:
        import faiss

        buffer = io.BytesIO()
        tables = io.BytesIO()
        pq.write_table(self.slides, tables)
        arrays = {
            "ivf": faiss.serialize_index(self.ivf),
            "slides": np.frombuffer(tables.getvalue(), np.uint8),
            "slide": self.slide,
            "centroid_index": self.centroid_index,
        }
        meta = {
            "built_from": self.built_from,
            "info": self.info,
            # faiss.deserialize_index is not hardened against crafted bytes: load checks
            # these before it hands any byte to faiss.
            "sha256": _index_digest(arrays),
            "tables_sha256": _tables_digest(output_root),
        }
        np.savez(buffer, **arrays, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        uri = index_uri(output_root)
        with FileSystems.create(uri) as handle:
            handle.write(buffer.getvalue())
        return uri

    @classmethod
    def load(cls, output_root: str) -> SearchIndex:
        """The saved index; ValueError if the tables changed since it was built."""
        import faiss

        uri = index_uri(output_root)
        if not FileSystems.exists(uri):
            raise FileNotFoundError(
                f"no search index at {uri}; build it with `pathembed index --output-root "
                f"{output_root}`"
            )
        with FileSystems.open(uri) as handle:
            saved = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        meta = json.loads(saved["meta"].tobytes())
        rebuild = f"rebuild it with `pathembed index --output-root {output_root}`"
        if meta["built_from"] != _table_file_sizes(output_root) or meta.get(
            "tables_sha256"
        ) != _tables_digest(output_root):
            raise ValueError(
                f"the search index at {uri} was built from other table files than are there "
                f"now; {rebuild}"
            )
        arrays = {name: saved[name] for name in ("ivf", "slides", "slide", "centroid_index")}
        if meta.get("sha256") != _index_digest(arrays):
            raise ValueError(
                f"the search index at {uri} does not match its recorded checksum (changed or "
                f"corrupted after it was built); {rebuild}"
            )
        return cls(
            ivf=faiss.deserialize_index(saved["ivf"]),
            slides=pq.read_table(pa.BufferReader(saved["slides"].tobytes())),
            slide=saved["slide"],
            centroid_index=saved["centroid_index"],
            built_from=meta["built_from"],
            info=meta["info"],
        )


def index_uri(output_root: str) -> str:
    return FileSystems.join(output_root.rstrip("/"), "tables", INDEX_FILE)


def _index_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of an index's arrays (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


_FOOTER_BYTES = 64 * 1024


def _tables_digest(output_root: str) -> str:
    """SHA-256 of the resource and search table files an index indexes: names, sizes and
    each file's last 64 KiB (the Parquet footer: schema, row groups, their offsets and
    statistics). Cheap on a 100 GB search table, and any rewritten file changes it."""
    digest = hashlib.sha256()
    for table in ("resource", "search"):
        found = FileSystems.match(table_files(output_root, table))
        for meta in (result.metadata_list[0] for result in found):
            name = posixpath.relpath(meta.path, table_dir(output_root, table))
            digest.update(f"{table}/{name}:{meta.size_in_bytes};".encode())
            with FileSystems.open(meta.path) as handle:
                handle.seek(max(0, meta.size_in_bytes - _FOOTER_BYTES))
                digest.update(handle.read())
    return digest.hexdigest()


def _table_file_sizes(output_root: str) -> dict[str, int]:
    """{"table/file.parquet": size} of the resource and search tables: what an index indexes."""
    sizes = {}
    for table in ("resource", "search"):
        for result in FileSystems.match(table_files(output_root, table)):
            found = result.metadata_list[0]
            name = posixpath.relpath(found.path, table_dir(output_root, table))
            sizes[f"{table}/{name}"] = found.size_in_bytes
    return sizes


def default_nlist(rows: int) -> int:
    """~4 sqrt(N) lists, the usual IVF choice, with enough rows per list to train."""
    return max(1, min(round(4 * math.sqrt(rows)), rows // _TRAIN_PER_LIST))


def nprobe_for(nlist: int, fraction_lists_to_search: float) -> int:
    """Lists probed per query, named as BigQuery names it (`fraction_lists_to_search`)."""
    if not 0 < fraction_lists_to_search <= 1:
        raise ValueError("fraction_lists_to_search must be in (0, 1]")
    return max(1, math.ceil(fraction_lists_to_search * nlist))


def build_index(
    output_root: str,
    *,
    nlist: int | None = None,
    fraction_lists_to_search: float = 0.05,
    recall_slides: int = 3,
    top_k: int = 20,
    block_rows: int = 8192,
    seed: int = 0,
) -> SearchIndex:
    """Builds the IVF index over the newest search rows and measures its recall@top_k.

    Two passes over the table (a training sample, then every row); recall is measured on
    `recall_slides` archive slides chosen at random, each queried like `pathembed search` does
    (its centroids, its own study excluded), against exact search.
    """
    import faiss

    resources = newest_resources(output_root)
    built_from = _table_file_sizes(output_root)
    rows_upper = 0
    for uri in table_files(output_root, "search"):
        with FileSystems.open(uri) as handle:
            rows_upper += pq.ParquetFile(handle).metadata.num_rows
    nlist = nlist or default_nlist(rows_upper)
    rng = np.random.default_rng(seed)
    share = min(1.0, _TRAIN_PER_LIST * nlist / max(rows_upper, 1))
    sample = []
    for batch in search_table_batches(output_root, resources, block_rows):
        rows = embedding_matrix(batch["embedding"])
        sample.append(rows[rng.random(len(rows)) < share])
    training = unit_rows(np.concatenate(sample)).astype(np.float32)
    if len(training) < nlist:
        raise ValueError(
            f"{len(training)} search rows cannot train {nlist} lists; use --nlist "
            f"{max(1, len(training) // _TRAIN_PER_LIST)} or fewer"
        )
    dimension = training.shape[1]
    ivf = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(dimension), dimension, nlist, faiss.METRIC_INNER_PRODUCT
    )
    ivf.train(training)
    slide, centroid_index = [], []
    uuids = resources["instance_uuid"]
    for batch in search_table_batches(output_root, resources, block_rows):
        ivf.add(unit_rows(embedding_matrix(batch["embedding"])).astype(np.float32))
        slide.append(pc.index_in(batch["instance_uuid"], value_set=uuids).to_numpy())
        centroid_index.append(batch["centroid_index"].to_numpy())
    index = SearchIndex(
        ivf=ivf,
        slides=resources,
        slide=np.concatenate(slide).astype(np.int32),
        centroid_index=np.concatenate(centroid_index).astype(np.int32),
        built_from=built_from,
        info={"rows": int(ivf.ntotal), "nlist": nlist},
    )
    index.info["nprobe"] = nprobe_for(nlist, fraction_lists_to_search)
    index.info["fraction_lists_to_search"] = fraction_lists_to_search
    index.info["recall"] = measure_recall(
        index, output_root, recall_slides, top_k=top_k, block_rows=block_rows, seed=seed
    )
    return index


def recall_at_k(exact: Hits, approximate: Hits, queries: int) -> np.ndarray:
    """Per query embedding with exact hits: the share of its exact top k the index found.

    An approximate hit counts when it is at least as similar as the exact k-th hit (less a
    float32 tolerance), so equally similar rows (copies of a slide) are interchangeable.
    """
    kth = np.full(queries, np.inf)
    np.minimum.at(kth, exact.query_index, exact.similarity)
    wanted = np.bincount(exact.query_index, minlength=queries)
    good = approximate.similarity >= kth[approximate.query_index] - _RECALL_TOLERANCE
    found = np.minimum(np.bincount(approximate.query_index[good], minlength=queries), wanted)
    asked = wanted > 0
    return found[asked] / wanted[asked]


def measure_recall(
    index: SearchIndex,
    output_root: str,
    slides: int,
    *,
    top_k: int = 20,
    block_rows: int = 8192,
    seed: int = 0,
) -> dict[str, Any]:
    """recall@top_k of the index against exact search, over `slides` random archive slides.

    `recall` is None when no query embedding had an exact hit (e.g. one study in the archive).
    """
    resources = index.slides
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(resources), size=min(slides, len(resources)), replace=False)
    nprobe = index.info["nprobe"]
    per_query = []
    for pick in sorted(picks):
        query = archive_query(
            output_root, resources, instance_uuid=resources["instance_uuid"][int(pick)].as_py()
        )
        exact = exact_hits(
            search_table_batches(output_root, resources, block_rows), resources,
            query.centroids, top_k, query.study_instance_uid,
        )  # fmt: skip
        approximate = index.hits(query.centroids, top_k, query.study_instance_uid, nprobe)
        per_query.append(recall_at_k(exact, approximate, len(query.centroids)))
    measured = np.concatenate(per_query) if per_query else np.zeros(0)
    return {
        "k": top_k,
        "recall": float(measured.mean()) if len(measured) else None,
        "query_embeddings": len(measured),
        "slides": len(picks),
        "nprobe": nprobe,
    }


def approximate_search(
    index: SearchIndex,
    query: SlideQuery,
    params: SearchParams,
    fraction_lists_to_search: float | None = None,
) -> list[SlideMatch]:
    """Search through the IVF index: the exact semantics, approximate top-k per embedding."""
    nprobe = index.info["nprobe"]
    if fraction_lists_to_search is not None:
        nprobe = nprobe_for(index.info["nlist"], fraction_lists_to_search)
    hits = index.hits(query.centroids, params.top_k, query.excluded_study(params), nprobe)
    return rank_slides(first_k_per_query(hits, params.top_k), index.slides, params)


@dataclass(frozen=True)
class BigQueryTables:
    """Where the BigQuery backend searches; the defaults are the published tables."""

    search: str = PUBLISHED_SEARCH_TABLE
    resource: str = PUBLISHED_RESOURCE_TABLE
    idc: str = IDC_METADATA_TABLE  # collection and protocol of each series


def bigquery_search_job(
    query: SlideQuery,
    params: SearchParams,
    tables: BigQueryTables = BigQueryTables(),
    fraction_lists_to_search: float = 0.005,
) -> tuple[str, Any]:
    """(SQL, QueryJobConfig) for transforms/sql/search.sql; checkable without credentials.

    A query with centroids sends them as a flat ARRAY<FLOAT64> parameter; a query without
    (a slide already in the search table) names its Study + Series UIDs and BigQuery reads
    its centroids there.
    """
    if not 0 < fraction_lists_to_search < 1:
        raise ValueError("BigQuery's fraction_lists_to_search must be in (0, 1), exclusive")
    if query.centroids is None:
        if query.study_instance_uid is None or query.series_instance_uid is None:
            raise ValueError("a query without centroids needs its Study and Series UIDs")
        flat, dimension = [], 1  # no embeddings: the dimension is never used
        study, series = query.study_instance_uid, query.series_instance_uid
    else:
        centroids = np.asarray(query.centroids, np.float64)
        flat, dimension = centroids.ravel().tolist(), centroids.shape[1]
        study = series = None
    sql = bigquery.render_sql(
        "search.sql",
        {"search_table": tables.search, "resource_table": tables.resource, "idc_table": tables.idc},
        {"fraction_lists_to_search": fraction_lists_to_search},
    )
    parameters = (
        ("query_study_uid", "STRING", study),
        ("query_series_uid", "STRING", series),
        ("query_embeddings", "ARRAY<FLOAT64>", flat),
        ("dimension", "INT64", dimension),
        ("exclude_study_uid", "STRING", query.excluded_study(params)),
        ("top_k", "INT64", params.top_k),
        ("result_limit", "INT64", params.limit),
        ("aggregate", "STRING", params.aggregate),
    )
    return sql, bigquery.Query(sql, parameters).job_config()


def bigquery_search(
    client: Any,
    query: SlideQuery,
    params: SearchParams,
    tables: BigQueryTables = BigQueryTables(),
    fraction_lists_to_search: float = 0.005,
    output_root: str = PUBLIC_OUTPUT_ROOT,
) -> list[SlideMatch]:
    """Runs the search in BigQuery; thumbnails are located under `output_root` by UUID."""
    sql, config = bigquery_search_job(query, params, tables, fraction_lists_to_search)
    matches = []
    for rank, row in enumerate(client.query(sql, job_config=config).result(), start=1):
        uuid = row["instance_uuid"]
        matches.append(
            SlideMatch(
                rank=rank,
                score=float(row["score"]),
                hits=int(row["hits"]),
                study_instance_uid=row["StudyInstanceUID"],
                series_instance_uid=row["SeriesInstanceUID"],
                instance_uuid=uuid,
                collection=row["collection"],
                protocol=row["protocol"],
                thumbnail_uri=thumbnail_uri(output_root, uuid) if uuid else None,
                # Only where the resource table records them (this project's tables).
                source_license=row.get("source_license"),
                source_doi=row.get("source_doi"),
            )
        )
    return matches


def thumbnail_uri(output_root: str, instance_uuid: str) -> str:
    """Where the published layout puts a slide's thumbnail."""
    return ArtifactPaths.for_slide(output_root, instance_uuid).thumbnail


# The seed's search SQL names its output columns so; search --json / --csv offer them too, so
# code written against the published example reads our results unchanged.
SEED_COLUMNS = ("CollectionName", "ProtocolName", "SumCosineSimilarity")


def matches_as_rows(matches: Iterable[SlideMatch], aggregate: str = "sum") -> list[dict[str, Any]]:
    """Each match as a dict, plus the seed's column names: CollectionName, ProtocolName and,
    when the score is a sum of cosine similarities (the seed's aggregate), SumCosineSimilarity
    (None for `max`, which is not what the seed's column means)."""
    rows = []
    for match in matches:
        row = dataclasses.asdict(match)
        row["CollectionName"] = match.collection
        row["ProtocolName"] = match.protocol
        row["SumCosineSimilarity"] = match.score if aggregate == "sum" else None
        rows.append(row)
    return rows


def describe_index(info: Mapping[str, Any]) -> str:
    """One line on an index and its measured recall, for the terminal."""
    recall = info["recall"]
    measured = (
        f"recall@{recall['k']} vs exact = {recall['recall']:.3f} over "
        f"{recall['query_embeddings']} query embeddings from {recall['slides']} slides"
        if recall["recall"] is not None
        else "recall not measured: no slide outside the sampled slides' studies"
    )
    return (
        f"IVF index: {info['rows']} rows in {info['nlist']} lists, probing {recall['nprobe']}; "
        f"{measured}"
    )
