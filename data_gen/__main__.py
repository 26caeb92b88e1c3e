"""`python -m data_gen generate CONFIG [overrides]` / `python -m data_gen dedup IN -o OUT`."""

import sys

from data_gen.cli import main

sys.exit(main())
