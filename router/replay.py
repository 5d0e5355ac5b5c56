"""The replay rule, stated once: when a request may be sent again, to another pod or on
another connection. `upstream.Client.request` and `proxy.Proxy._pool` only ask here.

A request goes to a second pod only when the first provably never received it, or
answered 503 to a body the router can send again byte for byte:

- The connect failed, or the connection was found gone before a single byte of the
  request was written to it: `ConnectFailed` is raised for these cases and no other.
- The pod answered 503 and the body is replayable (`to_next_pod`): held whole and of
  declared length (`RequestBody.replayable`). A body without `Content-Length` (chunked)
  never is, whatever the timing of its reads; an empty one is no body.

Anything else is final. A connection that fails after the request was written to it (a
reset, an end without an answer, a broken answer) is a 502 "The backend sandbox
connection failed." counted as an `error` attempt, pooled connection or not, whatever the
method: the pod may have read the request and acted on it, so it is neither sent to
another pod nor sent again to the same one.

The pod's idle-close race: a pooled connection may have been closed by the pod a moment
ago (its idle timeout), with the FIN or reset already in the kernel but not yet reported
by the event loop. So a pooled connection is written to only after `closed_by_pod` finds
it still open and quiet, with one zero-timeout `poll` of its socket right before the
write (an idle connection is readable only if an end, a reset or unasked bytes arrived).
That is sound because whatever the poll sees was sent before any byte of this request
existed: the pod cannot have read the request. Such a connection is dropped and the request takes
another connection to the same pod; nothing was sent, so this is no replay and holds for
any method and body. A close that arrives after the write, however soon, cannot be told
apart from a pod that read the request and died, so it is final.
"""

from __future__ import annotations

import asyncio
import select


def to_next_pod(status: int, replayable: bool) -> bool:
    """After an answer: another pod only for a 503 to a body that can be sent again."""
    return status == 503 and replayable


def watch(fd: int) -> select.poll:
    """The poll object `closed_by_pod` asks about the socket `fd`: one per pod connection,
    made when it connects (a new one per request was an allocation and a dictionary per
    request, #13; one shared by the process would fail under two event loops)."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)  # no system call until `poll` itself
    return poll


def closed_by_pod(transport: asyncio.Transport, watched: select.poll) -> bool:
    """True when this idle connection (`watched`: its socket, see `watch`) must not carry a
    request: the transport is closing, or the pod closed or reset it, or sent bytes nobody
    asked for (all pending unread)."""
    if transport.is_closing():
        return True
    return bool(watched.poll(0))  # POLLHUP and POLLERR are reported even unasked
