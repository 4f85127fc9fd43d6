"""Slide sources as Beam transforms, and the filter that skips done or unrequested slides."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import artifacts
from transforms.slides import FolderFailure, SlideRecord, enumerate_dicom_folder


class EnumerateDicomFolder(beam.PTransform):
    """Every WSI series under a folder -> SlideRecord (main) and 'failed' FolderFailures."""

    def __init__(
        self, folder: str, target_spacing_mm: float, tolerance: float, mask_spacing_mm: float
    ):
        super().__init__()
        self._folder = folder
        self._levels = (target_spacing_mm, tolerance, mask_spacing_mm)

    def _enumerate(self, folder: str) -> Iterator:
        found = Metrics.counter("pathembed", "slides_found")
        for item in enumerate_dicom_folder(folder, *self._levels):
            found.inc()
            yield (
                beam.pvalue.TaggedOutput("failed", item)
                if isinstance(item, FolderFailure)
                else item
            )

    def expand(self, pbegin):
        return (
            pbegin
            | "Folder" >> beam.Create([self._folder])
            | "ReadHeaders" >> beam.FlatMap(self._enumerate).with_outputs("failed", main="slides")
        )


class SkipDoneOrUnrequested(beam.DoFn):
    """Keeps slides that were asked for and are not complete with these parameters."""

    def __init__(
        self,
        *,
        output_root: str,
        dataset_version: str,
        n_clusters: int,
        parameter_hash: str,
        uuids: frozenset[str],
        force: bool,
    ):
        self._root = output_root
        self._version = dataset_version
        self._n_clusters = n_clusters
        self._hash = parameter_hash
        self._uuids = uuids
        self._force = force
        self._skipped = Metrics.counter("pathembed", "slides_skipped_complete")

    def process(self, record: SlideRecord) -> Iterator[SlideRecord]:
        if self._uuids and record.instance_uuid not in self._uuids:
            return
        if not self._force:
            paths = artifacts.ArtifactPaths.for_slide(
                self._root, record.instance_uuid, self._version, self._n_clusters
            )
            if artifacts.completed_parameter_hash(paths) == self._hash:
                self._skipped.inc()
                return
        yield record
