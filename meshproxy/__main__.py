"""`python -m meshproxy` runs the CLI."""

from meshproxy.cli import main

raise SystemExit(main())
