"""Run configurations shipped with the package: local.yaml (the built-in defaults, documented)
and idc.yaml (the full-archive Dataflow job, `pathembed launch`)."""
