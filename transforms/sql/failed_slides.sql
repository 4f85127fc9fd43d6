-- The slides of a failures table, for `pathembed rerun --failures project.dataset.table`.
-- Rendered by transforms.bigquery.render_sql: ${failures_table} is a validated table id;
-- @run_id (NULL: every run) and @reasons (empty: every reason code) are query parameters.
SELECT DISTINCT instance_uuid FROM `${failures_table}`
WHERE instance_uuid IS NOT NULL
  AND (@run_id IS NULL OR run_id = @run_id)
  AND (ARRAY_LENGTH(@reasons) = 0 OR reason_code IN UNNEST(@reasons))
