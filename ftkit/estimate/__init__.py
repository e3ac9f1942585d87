"""``ftkit estimate``: per-device memory of a training config under every method and sharding strategy."""

from ftkit.estimate.run import Estimate, estimate, run_estimate

__all__ = ["Estimate", "estimate", "run_estimate"]
