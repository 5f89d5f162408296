"""`python -m egp_fx ...` is the egp-fx command line (see egp_fx/cli/app.py)."""
import sys

from egp_fx.cli.app import main

sys.exit(main())
