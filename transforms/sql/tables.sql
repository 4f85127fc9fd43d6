-- pathembed's tables (DESIGN.md §5), generated from
-- transforms/outputs/tables.py by transforms.outputs.bigquery_sink.ddl_file_text();
-- tests/test_bigquery_sink.py checks that this file is current.
-- Render with transforms.bigquery.render_sql('tables.sql', ...):
-- ${resource_table}, ${search_table}, ${failures_table} and ${resource_history_table}
-- are validated table ids.
-- `embedding` holds 384 FLOAT64 per row: BigQuery cannot declare an array's length,
-- so both sinks check it (transforms/outputs/tables.py row_errors).

CREATE TABLE IF NOT EXISTS `${resource_table}` (
  instance_uuid STRING NOT NULL,
  StudyInstanceUID STRING NOT NULL,
  SeriesInstanceUID STRING NOT NULL,
  SOPInstanceUID STRING NOT NULL,
  collection STRING,
  instance_hash STRING,
  metadata_uri STRING NOT NULL,
  thumbnail_uri STRING NOT NULL,
  thumbnail_mask_uri STRING NOT NULL,
  embeddings_uri STRING NOT NULL,
  coordinates_uri STRING NOT NULL,
  centroids_uri STRING NOT NULL,
  labels_uri STRING NOT NULL,
  embedding_count INT64 NOT NULL,
  number_of_centroids INT64 NOT NULL,
  slide_pyramid_level_width INT64 NOT NULL,
  slide_pyramid_level_height INT64 NOT NULL,
  native_level_width INT64 NOT NULL,
  native_level_height INT64 NOT NULL,
  native_pixel_spacing_row_mm FLOAT64 NOT NULL,
  native_pixel_spacing_column_mm FLOAT64 NOT NULL,
  downsample FLOAT64 NOT NULL,
  mask_pixel_spacing_mm FLOAT64 NOT NULL,
  model_name STRING NOT NULL,
  model_version STRING NOT NULL,
  model_is_stand_in BOOL NOT NULL,
  idc_version STRING,
  pipeline_version STRING NOT NULL,
  parameter_hash STRING NOT NULL,
  run_id STRING NOT NULL,
  created_time TIMESTAMP NOT NULL,
  clustering_method STRING,
  clustering_parameters STRING,
  clustering_random_state INT64,
  source_license STRING,
  source_doi STRING,
  instance_pixeldata_SHA512_hash STRING
);

CREATE TABLE IF NOT EXISTS `${search_table}` (
  instance_uuid STRING NOT NULL,
  StudyInstanceUID STRING NOT NULL,
  SeriesInstanceUID STRING NOT NULL,
  SOPInstanceUID STRING NOT NULL,
  centroid_index INT64 NOT NULL,
  cluster_size INT64 NOT NULL,
  embedding ARRAY<FLOAT64>
);

CREATE TABLE IF NOT EXISTS `${failures_table}` (
  instance_uuid STRING,
  SeriesInstanceUID STRING,
  stage STRING NOT NULL,
  reason_code STRING NOT NULL,
  message STRING NOT NULL,
  run_id STRING NOT NULL,
  time TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS `${resource_history_table}` (
  instance_uuid STRING NOT NULL,
  StudyInstanceUID STRING NOT NULL,
  SeriesInstanceUID STRING NOT NULL,
  SOPInstanceUID STRING NOT NULL,
  collection STRING,
  instance_hash STRING,
  metadata_uri STRING NOT NULL,
  thumbnail_uri STRING NOT NULL,
  thumbnail_mask_uri STRING NOT NULL,
  embeddings_uri STRING NOT NULL,
  coordinates_uri STRING NOT NULL,
  centroids_uri STRING NOT NULL,
  labels_uri STRING NOT NULL,
  embedding_count INT64 NOT NULL,
  number_of_centroids INT64 NOT NULL,
  slide_pyramid_level_width INT64 NOT NULL,
  slide_pyramid_level_height INT64 NOT NULL,
  native_level_width INT64 NOT NULL,
  native_level_height INT64 NOT NULL,
  native_pixel_spacing_row_mm FLOAT64 NOT NULL,
  native_pixel_spacing_column_mm FLOAT64 NOT NULL,
  downsample FLOAT64 NOT NULL,
  mask_pixel_spacing_mm FLOAT64 NOT NULL,
  model_name STRING NOT NULL,
  model_version STRING NOT NULL,
  model_is_stand_in BOOL NOT NULL,
  idc_version STRING,
  pipeline_version STRING NOT NULL,
  parameter_hash STRING NOT NULL,
  run_id STRING NOT NULL,
  created_time TIMESTAMP NOT NULL,
  clustering_method STRING,
  clustering_parameters STRING,
  clustering_random_state INT64,
  source_license STRING,
  source_doi STRING,
  instance_pixeldata_SHA512_hash STRING,
  superseded_by_instance_uuid STRING NOT NULL,
  superseded_by_run_id STRING NOT NULL
);
