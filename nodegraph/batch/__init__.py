"""Batch runs: a workflow over a sweep of overrides, on local workers or a Ray pool (docs/batch.md)."""
from .dispatch import InProcessPool, dispatch
from .jobs import Job, Results
from .runner import Batch, BatchInvalid, Summary, plan, run_batch
from .sweep import SweepInvalid, read_sweep

__all__ = ["Batch", "BatchInvalid", "InProcessPool", "Job", "Results", "Summary", "SweepInvalid", "dispatch", "plan",
           "read_sweep", "run_batch"]
