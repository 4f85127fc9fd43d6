"""Slide-to-slide similarity search over the tables (exact, IVF, BigQuery) and the QC picture."""
