"""`python -m egp_fx ...` is the egp-fx command line (see egp_fx/cli.py)."""
import sys

from .cli import main

sys.exit(main())
