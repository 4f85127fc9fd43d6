-- pathembed: every SM series of IDC in scope, one row per series: a slide with every pyramid
-- level, or the reason it is not embedded. No series is dropped without a trace.
--
-- Rendered by transforms/sources/idc.py (render_slides_query): `${dicom_all}` is replaced by the
-- validated table identifier of a pinned release (default bigquery-public-data.idc_v25.dicom_all,
-- the release of the offline index idc-index-data 25.0.5), `${mutable_metadata}` by the table of
-- current object URLs (default bigquery-public-data.idc_current.mutable_metadata: IDC never
-- updates a pinned release's gcs_url/aws_url after publication, so a bucket move would break the
-- pinned ones; the current URL wins, the pinned one is the fallback). Everything a user chooses
-- is a query parameter:
--   @collections  ARRAY<STRING>  collection_id values; empty = every collection
--   @uuids        ARRAY<STRING>  crdc_instance_uuid values; empty = every series; a series is
--                                kept when one of its instances has one of these UUIDs
--   @max_slides   INT64          at most this many series (ordered by SeriesInstanceUID)
--
-- In scope: every series with Modality SM (in the collections, with the UUIDs). `reason` is NULL
-- for a slide, else the failure reason code (transforms/errors.py), first that applies:
--   no_pyramid       no VOLUME instance of VL Whole Slide Microscopy Image Storage
--   multiple_planes  a VOLUME level with more than one optical path or focal plane
--   not_brightfield  a VOLUME level whose optical path carries no transmitted-light
--                    illumination code. Accepted (DICOM CID 8123): DCM 111741 "Transmission
--                    illumination" (what Google-converted and many vendor slides carry) and
--                    DCM 111744 "Brightfield illumination". Fluorescence (111743), reflection
--                    (111742), dark field (111745) etc. are refused; so is a level with no
--                    illumination code at all (nothing says it is brightfield).
-- Slides (reason NULL) carry all their VOLUME levels; the embedding and mask levels are chosen
-- right after the query, in Python, by transforms/levels.choose_levels (DESIGN.md §3), the
-- same rule every other source uses.
WITH sm AS (
  SELECT
    d.collection_id,
    d.license_short_name,
    d.source_DOI,
    d.StudyInstanceUID,
    d.SeriesInstanceUID,
    d.SOPInstanceUID,
    d.crdc_instance_uuid,
    COALESCE(current_urls.gcs_url, d.gcs_url) AS gcs_url,
    COALESCE(current_urls.aws_url, d.aws_url) AS aws_url,
    d.instance_hash,
    SAFE_CAST(d.instance_size AS INT64) AS instance_size,
    d.TransferSyntaxUID,
    SAFE_CAST(d.TotalPixelMatrixColumns AS INT64) AS width,
    SAFE_CAST(d.TotalPixelMatrixRows AS INT64) AS height,
    SAFE_CAST(d.`Columns` AS INT64) AS frame_width,
    SAFE_CAST(d.`Rows` AS INT64) AS frame_height,
    SAFE_CAST(
      d.SharedFunctionalGroupsSequence[SAFE_OFFSET(0)]
        .PixelMeasuresSequence[SAFE_OFFSET(0)].PixelSpacing[SAFE_OFFSET(0)] AS FLOAT64
    ) AS spacing_row_mm,
    SAFE_CAST(
      d.SharedFunctionalGroupsSequence[SAFE_OFFSET(0)]
        .PixelMeasuresSequence[SAFE_OFFSET(0)].PixelSpacing[SAFE_OFFSET(1)] AS FLOAT64
    ) AS spacing_column_mm,
    COALESCE(
      d.SOPClassUID = '1.2.840.10008.5.1.4.1.1.77.1.6' AND 'VOLUME' IN UNNEST(d.ImageType),
      FALSE
    ) AS is_volume,
    -- optical paths: NumberOfOpticalPaths when present, else the sequence's length
    COALESCE(
      SAFE_CAST(d.NumberOfOpticalPaths AS INT64), ARRAY_LENGTH(d.OpticalPathSequence), 1
    ) AS optical_paths,
    COALESCE(SAFE_CAST(d.TotalPixelMatrixFocalPlanes AS INT64), 1) AS focal_planes,
    EXISTS (
      SELECT 1
      FROM UNNEST(d.OpticalPathSequence) AS path,
        UNNEST(path.IlluminationTypeCodeSequence) AS code
      WHERE code.CodingSchemeDesignator = 'DCM' AND code.CodeValue IN ('111741', '111744')
    ) AS transmitted_light
  FROM `${dicom_all}` AS d
  LEFT JOIN `${mutable_metadata}` AS current_urls
    ON current_urls.crdc_instance_uuid = d.crdc_instance_uuid
  WHERE
    d.Modality = 'SM'
    AND (ARRAY_LENGTH(@collections) = 0 OR d.collection_id IN UNNEST(@collections))
),
series AS (
  SELECT
    SeriesInstanceUID,
    ANY_VALUE(collection_id) AS collection_id,
    ANY_VALUE(license_short_name) AS license_short_name,
    ANY_VALUE(source_DOI) AS source_DOI,
    ANY_VALUE(StudyInstanceUID) AS StudyInstanceUID,
    MIN(crdc_instance_uuid) AS any_instance_uuid,
    MAX(IF(is_volume, optical_paths, 0)) AS max_optical_paths,
    MAX(IF(is_volume, focal_planes, 0)) AS max_focal_planes,
    CASE
      WHEN NOT LOGICAL_OR(is_volume) THEN 'no_pyramid'
      WHEN MAX(IF(is_volume, optical_paths, 1)) > 1 OR MAX(IF(is_volume, focal_planes, 1)) > 1
        THEN 'multiple_planes'
      WHEN NOT LOGICAL_AND(IF(is_volume, transmitted_light, TRUE)) THEN 'not_brightfield'
    END AS reason
  FROM sm
  GROUP BY SeriesInstanceUID
  HAVING ARRAY_LENGTH(@uuids) = 0 OR LOGICAL_OR(crdc_instance_uuid IN UNNEST(@uuids))
  ORDER BY SeriesInstanceUID
  LIMIT @max_slides
),
levels AS (
  SELECT
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
  FROM sm
  WHERE is_volume
  GROUP BY SeriesInstanceUID
)
SELECT
  series.collection_id,
  series.license_short_name,
  series.source_DOI,
  series.StudyInstanceUID,
  series.SeriesInstanceUID,
  series.reason,
  series.any_instance_uuid,
  series.max_optical_paths,
  series.max_focal_planes,
  levels.levels
FROM series
LEFT JOIN levels ON levels.SeriesInstanceUID = series.SeriesInstanceUID
ORDER BY series.SeriesInstanceUID
