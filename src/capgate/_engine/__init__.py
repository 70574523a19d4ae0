"""The engine under the gate: one waiting core (:mod:`.waiting`) over one store.

``make_engine`` decides once, at construction, which store a gate runs on; nothing after it
asks again. A store is the :class:`~capgate._engine.base.Store` seam: the in-memory one
(:mod:`.local`, with the pure accounting rule in :mod:`.ledger`) or a backend that a store
object opens for the gate (``RedisStore`` opens :mod:`.fleet`).
"""

from __future__ import annotations

from typing import Any

import httpx

from .._config import GateConfig
from .base import Store
from .local import MemoryStore
from .waiting import Engine

__all__ = ["Engine", "make_engine"]


def make_engine(config: GateConfig, store: Any, client: httpx.AsyncClient | None) -> Engine:
    """The engine for a gate: the in-memory store, or the one ``store`` opens.

    Raises:
        TypeError: ``store`` is not a store capgate knows how to open.
    """
    backend: Store
    if store is None:
        backend = MemoryStore(config)
    else:
        opener = getattr(store, "_open_store", None)
        if not callable(opener):
            raise TypeError(f"store must be a capgate.redis.RedisStore, not {type(store).__name__}")
        backend = opener(config)
    return Engine(config, backend, client)
