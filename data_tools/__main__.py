"""`python -m data_tools` runs the `exaone-data` command."""

import sys

from data_tools.cli import main

sys.exit(main())
