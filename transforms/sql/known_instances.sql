-- The slides a resource table already holds, for `pathembed run --only-new`.
-- Rendered by transforms.bigquery.render_sql: ${resource_table} is a validated table id.
SELECT instance_uuid, instance_hash FROM `${resource_table}`
