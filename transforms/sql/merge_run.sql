-- Merges one run's staging tables into the final tables, so that reruns never duplicate rows.
--
-- Each run loads its rows (WriteToBigQuery, FILE_LOADS) into its own staging tables; this
-- script, run once the job has finished (transforms/outputs/bigquery_sink.py merge_run, after the
-- CREATE TABLE IF NOT EXISTS of tables.sql for the final and the staging tables):
--   resource, search  the rows of every slide the run wrote replace that slide's rows (all of
--                     its centroids, so a slide re-embedded with fewer centroids keeps none of
--                     the old ones); other slides' rows are untouched;
--   failures          the run's failure rows replace any earlier merge of the same run;
--   resource_history  IDC re-issues the UUID of every instance it changes in a release: a
--                     slide of a series the run embedded under another instance UUID is
--                     superseded. Its resource row moves to the history table (with the UUID
--                     and run that replaced it) and its search rows are deleted, so search
--                     counts the series once and a lookup by Study/Series UIDs (the seed's
--                     `LIMIT 1`) can only return the current UUID;
-- all in one transaction (readers see the tables before or after, never between), then drops
-- the staging tables. Rendered by transforms.bigquery.render_sql: each placeholder is a validated
-- table id (project.dataset.table).
BEGIN TRANSACTION;

INSERT INTO `${resource_history_table}`
SELECT old.*, new.instance_uuid, new.run_id
FROM `${resource_table}` AS old
JOIN `${staging_resource}` AS new
  ON old.SeriesInstanceUID = new.SeriesInstanceUID AND old.instance_uuid != new.instance_uuid;

DELETE FROM `${search_table}`
WHERE instance_uuid IN (
  SELECT old.instance_uuid
  FROM `${resource_table}` AS old
  JOIN `${staging_resource}` AS new
    ON old.SeriesInstanceUID = new.SeriesInstanceUID AND old.instance_uuid != new.instance_uuid
);

DELETE FROM `${resource_table}`
WHERE instance_uuid IN (
  SELECT old.instance_uuid
  FROM `${resource_table}` AS old
  JOIN `${staging_resource}` AS new
    ON old.SeriesInstanceUID = new.SeriesInstanceUID AND old.instance_uuid != new.instance_uuid
);

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
