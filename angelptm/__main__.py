"""`python -m angelptm ...` is the `angelptm` command."""

import sys

from angelptm.cli import main

sys.exit(main())
