-- Merges one run's staging tables into the final tables, so that reruns never duplicate rows.
--
-- Each run loads its rows (WriteToBigQuery, FILE_LOADS) into its own staging tables; this
-- script, run once the job has finished (transforms/outputs/bigquery_sink.py merge_run, after the
-- CREATE TABLE IF NOT EXISTS of tables.sql for the final and the staging tables):
--   resource, search  the rows of every slide the run wrote replace that slide's rows (all of
--                     its centroids, so a slide re-embedded with fewer centroids keeps none of
--                     the old ones); other slides' rows are untouched;
--   failures          the run's failure rows replace any earlier merge of the same run;
-- all in one transaction (readers see the tables before or after, never between), then drops
-- the staging tables. Rendered by transforms.bigquery.render_sql: each placeholder is a validated
-- table id (project.dataset.table).
BEGIN TRANSACTION;

DELETE FROM `${resource_table}`
WHERE instance_uuid IN (SELECT instance_uuid FROM `${staging_resource}`);
INSERT INTO `${resource_table}` SELECT * FROM `${staging_resource}`;

DELETE FROM `${search_table}`
WHERE instance_uuid IN (SELECT instance_uuid FROM `${staging_resource}`);
INSERT INTO `${search_table}` SELECT * FROM `${staging_search}`;

DELETE FROM `${failures_table}`
WHERE run_id IN (SELECT DISTINCT run_id FROM `${staging_failures}`);
INSERT INTO `${failures_table}` SELECT * FROM `${staging_failures}`;

COMMIT TRANSACTION;

DROP TABLE `${staging_resource}`;
DROP TABLE `${staging_search}`;
DROP TABLE `${staging_failures}`;
