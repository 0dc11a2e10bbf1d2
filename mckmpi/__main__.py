"""`python -m mckmpi` is the `mckmpi` command."""

import sys

from mckmpi.frontend.cli import main

sys.exit(main())
