"""`python -m retrain ...` is `retrain ...`."""

import sys

from retrain.cli import main

sys.exit(main())
