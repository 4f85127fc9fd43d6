-- pathembed: the IDC slides to embed, one row per slide (SM series), with every pyramid level.
--
-- Rendered by transforms/idc.py (render_slides_query): `${dicom_all}` is replaced by the
-- validated table identifier (default bigquery-public-data.idc_v20.dicom_all, a pinned IDC
-- release); everything a user chooses is a query parameter:
--   @collections  ARRAY<STRING>  collection_id values; empty = every collection
--   @uuids        ARRAY<STRING>  crdc_instance_uuid values; empty = every slide; a slide is
--                                kept when one of its levels has one of these UUIDs
--   @max_slides   INT64          at most this many slides (ordered by SeriesInstanceUID)
--
-- A slide is an SM series of VL Whole Slide Microscopy images whose VOLUME levels are all
-- brightfield, one optical path and one focal plane. The embedding and mask levels are chosen
-- right after the query, in Python, by transforms/levels.choose_levels (DESIGN.md §3), the
-- same rule every other source uses; so this query returns all VOLUME levels of a slide.
WITH volume AS (
  SELECT
    collection_id,
    StudyInstanceUID,
    SeriesInstanceUID,
    SOPInstanceUID,
    crdc_instance_uuid,
    gcs_url,
    aws_url,
    instance_hash,
    SAFE_CAST(instance_size AS INT64) AS instance_size,
    TransferSyntaxUID,
    SAFE_CAST(TotalPixelMatrixColumns AS INT64) AS width,
    SAFE_CAST(TotalPixelMatrixRows AS INT64) AS height,
    SAFE_CAST(`Columns` AS INT64) AS frame_width,
    SAFE_CAST(`Rows` AS INT64) AS frame_height,
    SAFE_CAST(
      SharedFunctionalGroupsSequence[SAFE_OFFSET(0)]
        .PixelMeasuresSequence[SAFE_OFFSET(0)].PixelSpacing[SAFE_OFFSET(0)] AS FLOAT64
    ) AS spacing_row_mm,
    SAFE_CAST(
      SharedFunctionalGroupsSequence[SAFE_OFFSET(0)]
        .PixelMeasuresSequence[SAFE_OFFSET(0)].PixelSpacing[SAFE_OFFSET(1)] AS FLOAT64
    ) AS spacing_column_mm,
    -- one optical path: NumberOfOpticalPaths when present, else the sequence's length
    COALESCE(SAFE_CAST(NumberOfOpticalPaths AS INT64), ARRAY_LENGTH(OpticalPathSequence))
      AS optical_paths,
    COALESCE(SAFE_CAST(TotalPixelMatrixFocalPlanes AS INT64), 1) AS focal_planes,
    EXISTS (
      SELECT 1
      FROM UNNEST(OpticalPathSequence) AS path,
        UNNEST(path.IlluminationTypeCodeSequence) AS code
      WHERE code.CodingSchemeDesignator = 'DCM' AND code.CodeValue = '111744'
    ) AS brightfield
  FROM `${dicom_all}`
  WHERE
    Modality = 'SM'
    AND SOPClassUID = '1.2.840.10008.5.1.4.1.1.77.1.6'
    AND 'VOLUME' IN UNNEST(ImageType)
    AND (ARRAY_LENGTH(@collections) = 0 OR collection_id IN UNNEST(@collections))
),
slides AS (
  SELECT SeriesInstanceUID
  FROM volume
  GROUP BY SeriesInstanceUID
  HAVING
    LOGICAL_AND(brightfield)
    AND LOGICAL_AND(optical_paths = 1)
    AND LOGICAL_AND(focal_planes = 1)
    AND (ARRAY_LENGTH(@uuids) = 0 OR LOGICAL_OR(crdc_instance_uuid IN UNNEST(@uuids)))
  ORDER BY SeriesInstanceUID
  LIMIT @max_slides
)
SELECT
  ANY_VALUE(collection_id) AS collection_id,
  ANY_VALUE(StudyInstanceUID) AS StudyInstanceUID,
  SeriesInstanceUID,
  ARRAY_AGG(
    STRUCT(
      SOPInstanceUID,
      crdc_instance_uuid,
      gcs_url,
      aws_url,
      instance_hash,
      instance_size,
      TransferSyntaxUID,
      width,
      height,
      frame_width,
      frame_height,
      spacing_row_mm,
      spacing_column_mm
    )
    ORDER BY width DESC, SOPInstanceUID
  ) AS levels
FROM volume
JOIN slides USING (SeriesInstanceUID)
GROUP BY SeriesInstanceUID
ORDER BY SeriesInstanceUID
