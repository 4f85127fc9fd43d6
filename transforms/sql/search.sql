-- Slide similarity search with VECTOR_SEARCH: the seed's query (DESIGN.md §5), corrected.
--
-- For each query embedding (a slide's centroids), the @top_k closest search-table rows by
-- cosine similarity, leaving out the study @exclude_study_uid; the hits aggregated per
-- (StudyInstanceUID, SeriesInstanceUID) by SUM (default) or MAX of similarity; the best
-- @result_limit slides, with their instance UUID and IDC collection and protocol.
--
-- Fix of the seed: VECTOR_SEARCH(distance_type => 'COSINE') returns cosine DISTANCE,
-- 1 - cosine similarity (0 = same direction, 2 = opposite). The seed summed that distance as
-- "CosineSimilarity" and sorted it DESC, so the slides FARTHEST from the query came first.
-- Here similarity = 1 - distance is what is summed (or maxed) and sorted DESC.
--
-- Rendered by transforms/search/ranking.py (bigquery_search_job): ${search_table}, ${resource_table}
-- and ${idc_table} are validated table ids, and ${fraction_lists_to_search} a number in (0, 1)
-- (BigQuery takes `options` only as a literal). Every other value is a query parameter:
--   @query_study_uid, @query_series_uid  STRING  query by a slide already in the search table
--                                                (both NULL when querying by embeddings)
--   @query_embeddings  ARRAY<FLOAT64>  query embeddings, row-major [count * @dimension]
--   @dimension         INT64           values per embedding
--   @exclude_study_uid STRING          study left out of the search (NULL: search everything)
--   @top_k, @result_limit  INT64;  @aggregate  STRING ('sum' | 'max')
WITH
  query_embeddings AS (
    SELECT embedding
    FROM `${search_table}`
    WHERE StudyInstanceUID = @query_study_uid AND SeriesInstanceUID = @query_series_uid
    UNION ALL
    SELECT ARRAY_AGG(value ORDER BY position) AS embedding
    FROM UNNEST(@query_embeddings) AS value WITH OFFSET AS position
    GROUP BY DIV(position, @dimension)
  ),
  hits AS (
    SELECT
      base.StudyInstanceUID AS StudyInstanceUID,
      base.SeriesInstanceUID AS SeriesInstanceUID,
      1 - distance AS similarity
    FROM
      VECTOR_SEARCH(
        -- The exclusion is a pre-filter of the base table, as in the seed. With an IVF index
        -- that does not store StudyInstanceUID it becomes a post-filter, which can leave fewer
        -- than @top_k hits for a query embedding.
        (
          SELECT *
          FROM `${search_table}`
          WHERE @exclude_study_uid IS NULL OR StudyInstanceUID != @exclude_study_uid
        ),
        'embedding',
        (SELECT embedding FROM query_embeddings),
        top_k => @top_k,
        distance_type => 'COSINE',
        options => '{"fraction_lists_to_search": ${fraction_lists_to_search}}')
  ),
  matches AS (
    SELECT
      StudyInstanceUID,
      SeriesInstanceUID,
      IF(@aggregate = 'max', MAX(similarity), SUM(similarity)) AS score,
      COUNT(*) AS hits
    FROM hits
    GROUP BY StudyInstanceUID, SeriesInstanceUID
    ORDER BY score DESC, StudyInstanceUID, SeriesInstanceUID
    LIMIT @result_limit
  ),
  -- `matches` is referenced once: BigQuery may evaluate a WITH clause once per reference,
  -- and each evaluation would repeat the vector search.
  slides AS (
    SELECT StudyInstanceUID, SeriesInstanceUID, ANY_VALUE(instance_uuid) AS instance_uuid
    FROM `${resource_table}`
    GROUP BY StudyInstanceUID, SeriesInstanceUID
  ),
  idc AS (
    SELECT
      StudyInstanceUID,
      SeriesInstanceUID,
      ANY_VALUE(collection_name) AS collection,
      ANY_VALUE(ClinicalTrialProtocolName) AS protocol
    FROM `${idc_table}`
    GROUP BY StudyInstanceUID, SeriesInstanceUID
  )
SELECT
  matches.StudyInstanceUID,
  matches.SeriesInstanceUID,
  matches.score,
  matches.hits,
  slides.instance_uuid,
  idc.collection,
  idc.protocol
FROM matches
LEFT JOIN slides USING (StudyInstanceUID, SeriesInstanceUID)
LEFT JOIN idc USING (StudyInstanceUID, SeriesInstanceUID)
ORDER BY matches.score DESC, matches.StudyInstanceUID, matches.SeriesInstanceUID
