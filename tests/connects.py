"""Every `connect()` this process makes, observed through the interpreter's audit hook.

The `socket.connect` audit event fires inside `socket.connect`/`connect_ex` themselves, so
it sees the router's upstream client (asyncio connects with them) whatever code path led
there: a test that finds no event for an address knows no connection to it was tried.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

Connect = tuple[str, int]

_recorders: list[list[Connect]] = []
_lock = threading.Lock()


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event != "socket.connect" or not _recorders:
        return
    address = args[1]
    if isinstance(address, tuple):  # AF_INET / AF_INET6; a Unix path is not a pod
        with _lock:
            for seen in _recorders:
                seen.append((str(address[0]), int(address[1])))


sys.addaudithook(_hook)  # audit hooks cannot be removed: one for the whole session


@contextmanager
def recorded_connects() -> Iterator[list[Connect]]:
    """The (address, port) of every connect() in any thread while the block runs."""
    seen: list[Connect] = []
    with _lock:
        _recorders.append(seen)
    try:
        yield seen
    finally:
        with _lock:
            _recorders.remove(seen)
