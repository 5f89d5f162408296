"""The error the prune package raises on purpose: egp_fx.errors.PruneError (one class, so that
`except egp_fx.PruneError` catches what egp_fx.prune raises)."""
from egp_fx.errors import PruneError

__all__ = ["PruneError"]
