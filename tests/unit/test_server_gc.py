"""``herald serve`` tunes the cyclic GC once the node serves (gateway/server.py)."""

from __future__ import annotations

import gc

from gateway.server import GC_THRESHOLDS, tune_gc


def test_startup_objects_are_frozen_and_full_passes_come_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 1000  # the modules and the node's parts
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[2] > before[2]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
