-- One slide of a resource table (DESIGN.md §5), by instance UUID or by Study + Series UIDs.
-- Rendered by transforms/outputs/archive.py: ${resource_table} is a validated table id; the slide is named
-- only through query parameters: @instance_uuid, or @study_instance_uid and @series_instance_uid
-- (the others NULL, which match nothing).
SELECT instance_uuid, StudyInstanceUID, SeriesInstanceUID
FROM `${resource_table}`
WHERE instance_uuid = @instance_uuid
  OR (StudyInstanceUID = @study_instance_uid AND SeriesInstanceUID = @series_instance_uid)
LIMIT 1
