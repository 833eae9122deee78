"""Old path of :mod:`alter.adapters` (patching in :mod:`.patching`, files in :mod:`.io`)."""
from alter.adapters import *  # noqa: F401,F403
from alter.adapters.io import METADATA_KEY  # noqa: F401
