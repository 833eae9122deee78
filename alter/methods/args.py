"""Moved to :mod:`alter.training.args`; this module re-exports its names."""
from alter.training.args import (  # noqa: F401
    DEFAULT_EARLY_STOP_SHARE,
    DISTRIBUTED_MODES,
    STRUCTURAL_MODES,
    UnlearnArgs,
    check_early_stop_share,
    check_positive,
    check_positive_number,
)
