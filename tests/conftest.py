"""Test-run settings shared by every test file."""
import os

from hypothesis import Phase, settings

# tests/mutants.py only needs to know that a property fails, not the smallest failing example
settings.register_profile("mutants", phases=[Phase.explicit, Phase.reuse, Phase.generate])
if os.environ.get("EGP_FX_MUTANTS"):
    settings.load_profile("mutants")
