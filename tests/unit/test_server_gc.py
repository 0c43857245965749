"""``herald serve`` leaves its startup objects out of the cyclic GC's passes
and makes young passes rarer (gateway/server.py)."""

from __future__ import annotations

import gc

from gateway.server import YOUNG_GC_THRESHOLD, tune_gc


def test_what_exists_at_start_is_frozen_and_young_passes_are_rarer() -> None:
    thresholds = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 1000  # the modules and the node's parts
        assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, *thresholds[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
