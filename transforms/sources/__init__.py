"""Where slides come from: a DICOM folder or bucket prefix, a manifest, the IDC index, BigQuery,
a DICOMweb store (enumeration.py picks one by source.kind); each yields SlideRecords."""
