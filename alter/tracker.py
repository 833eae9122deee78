"""Old path of :mod:`alter.adapters.state`."""
from alter.adapters.state import CallState, EntropyTracker  # noqa: F401
