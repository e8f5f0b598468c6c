"""`python -m cli`: the `tracewatch` command."""

import sys

from cli.main import main

sys.exit(main())
