"""``herald serve`` leaves its startup objects out of the cyclic GC's passes
(gateway/server.py)."""

from __future__ import annotations

import gc

from gateway.server import freeze_startup_objects


def test_what_exists_at_start_is_frozen() -> None:
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 1000  # the modules and the node's parts
    finally:
        gc.unfreeze()
