"""A WebSocket sandbox for tests: aiohttp's real WebSocket server on its own loopback IP,
in a thread with its own event loop.

It echoes every message (text and binary, any size), offers the subprotocol `chat.v2`,
closes with code 4001 when sent the text "close 4001", answers the handshake 503 while
`busy` (and an ordinary request 200 "plain"), and remembers what it saw: each
handshake's headers, each close code a client sent, how many connections ended."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from router.server import bind

SUBPROTOCOL = "chat.v2"
CLOSE_ME = "close 4001"


@dataclass
class WsPod:
    name: str
    ip: str
    port: int = 0
    busy: bool = False
    handshakes: list[dict[str, str]] = field(default_factory=list)
    client_close_codes: list[int | None] = field(default_factory=list)
    ended: int = 0
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _transports: set[asyncio.BaseTransport] = field(default_factory=set)
    _runner: web.AppRunner | None = None

    def start(self) -> WsPod:
        sock = bind(self.ip, self.port)
        self.port = sock.getsockname()[1]
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=0.1)
        self._loop.run_until_complete(self._runner.setup())
        site = web.SockSite(self._runner, sock)
        self._loop.run_until_complete(site.start())
        threading.Thread(target=self._loop.run_forever, daemon=True, name=self.name).start()
        return self

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.busy:
            return web.Response(status=503, text="busy")
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=0)
        if not ws.can_prepare(request).ok:
            return web.Response(text="plain")
        self.handshakes.append(dict(request.headers))
        await ws.prepare(request)
        assert request.transport is not None
        self._transports.add(request.transport)
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT and message.data == CLOSE_ME:
                    await ws.close(code=4001, message=b"bye")
                elif message.type == WSMsgType.TEXT:
                    await ws.send_str(message.data)
                elif message.type == WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
            if ws.close_code != 4001:  # 4001 is our own
                self.client_close_codes.append(ws.close_code)
        finally:
            self._transports.discard(request.transport)
            self.ended += 1
        return ws

    def die(self) -> None:
        """Every open connection reset, as when the sandbox process is killed."""
        def abort() -> None:
            for transport in list(self._transports):
                transport.abort()  # type: ignore[attr-defined]

        self._loop.call_soon_threadsafe(abort)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
