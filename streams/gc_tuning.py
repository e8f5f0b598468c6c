"""Garbage-collector settings for long-running, allocation-heavy processes.

The detectors allocate many short-lived dicts and lists per event and almost no reference
cycles; CPython's default gen-0 threshold (700) runs a collection every few events, and every
full collection walks the start-up objects (modules, the catalog, Faust's machinery) again.
Measured on replay: collection was 15-20% of CPU (`../shared/PERFORMANCE.md`). Freezing what
exists after start-up and raising the gen-0 threshold keeps collection for real garbage cycles.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000


def tune() -> None:
    """Call once start-up is done (catalog loaded, app built)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
