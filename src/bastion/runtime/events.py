"""Deprecated: the event store moved to :mod:`bastion.store.events` (the ground floor).

``bastion.runtime.events`` is the very same module object, kept only so code written
against the old path still runs; import :mod:`bastion.store.events` instead.
"""

import sys

from bastion.store import events as _events

sys.modules[__name__] = _events
