-- The search table's vector index, TreeAH (ScaNN) variant of vector_index_ivf.sql: create one
-- or the other (a column holds one vector index). Rendered by transforms.bigquery.render_sql:
-- ${search_table} is a validated table id.
--
-- When to prefer it: BigQuery recommends IVF for small query batches and TreeAH for large
-- ones. A slide query here sends every centroid of the query slide (up to 500 embeddings) in
-- one VECTOR_SEARCH, and a cohort query many slides at once: large batches, where TreeAH's
-- asymmetric-hashing scan is cheaper than IVF. Keep IVF for one-embedding or few-embedding
-- lookups, and when matching the published dataset's setup matters.
CREATE VECTOR INDEX IF NOT EXISTS path_foundation_500_embeddings_treeah
ON `${search_table}`(embedding)
STORING (instance_uuid, StudyInstanceUID, SeriesInstanceUID)
OPTIONS (
  index_type = 'TREE_AH',
  distance_type = 'COSINE',
  tree_ah_options = '{"leaf_node_embedding_count": 1000}'
);
