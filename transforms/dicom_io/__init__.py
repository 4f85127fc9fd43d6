"""How bytes and frames are read: byte ranges of local, gs://, s3:// and http(s) files, DICOMweb,
retries, frame-grid arithmetic and instance hashes. The ez-wsi internals we override live here."""
