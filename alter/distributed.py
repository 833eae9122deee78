"""Moved to :mod:`alter.training.distributed`; this module re-exports its names."""
from alter.training.distributed import DISTRIBUTED_ENV, Engine, _fully_shard, launched  # noqa: F401
