-- The search table's vector index, IVF (as the published dataset: "indexed using the BigQuery
-- IVF method"). Rendered by transforms.bigquery.render_sql: ${search_table} is a validated
-- table id. Run once after the first merge; BigQuery keeps the index current as rows change.
--
-- num_lists: ~32.5M centroid rows (IDC v20) / 5000 lists = ~6,500 rows a list; a query reads
-- fraction_lists_to_search of the lists (transforms/sql/search.sql, seed: 0.005 = 25
-- lists). Fewer lists for a small table (BigQuery picks one when ivf_options is left out).
-- STORING the UIDs lets VECTOR_SEARCH apply search.sql's StudyInstanceUID exclusion as a
-- pre-filter inside the index instead of after it (so every query embedding keeps top_k hits).
CREATE VECTOR INDEX IF NOT EXISTS path_foundation_500_embeddings_ivf
ON `${search_table}`(embedding)
STORING (instance_uuid, StudyInstanceUID, SeriesInstanceUID)
OPTIONS (
  index_type = 'IVF',
  distance_type = 'COSINE',
  ivf_options = '{"num_lists": 5000}'
);
