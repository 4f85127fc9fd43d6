"""`python -m pipeline` is the `pathembed` command."""

from pipeline.cli import main

raise SystemExit(main())
