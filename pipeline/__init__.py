"""The command line and the DAG composition: cli.py registers the subcommands (run.py, launch.py,
search_cli.py), config.py reads the YAML config, dag.py composes transforms/ into the DAG,
summary.py reports a finished run. No domain logic lives here."""
