"""The front freezes its start-up heap so full collections stop scanning it."""

from __future__ import annotations

import gc

from hsmproxy.server.app import settle_heap


def test_settle_heap_moves_live_objects_out_of_the_collected_generations() -> None:
    gc.unfreeze()
    marker = [[i] for i in range(1000)]  # lists: tracked by the collector
    try:
        assert any(o is marker for o in gc.get_objects())
        settle_heap()
        assert gc.get_freeze_count() >= len(marker)
        assert not any(o is marker for o in gc.get_objects())  # in the permanent generation now
    finally:
        gc.unfreeze()
