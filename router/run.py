"""Running the router as a process: one server, or with `--workers N` a supervisor of N
server processes sharing one listening socket. (Apart from `__main__` so that worker
processes, which are spawned, can import what they run.)"""

from __future__ import annotations

import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from types import FrameType

from router import config, logs
from router.app import Router
from router.server import DrainingServer, bind, server_config

log = logging.getLogger("router.run")


def serve(options: config.Config, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM (drained: exit 0) or SIGINT. A start-up failure (a port in use)
    exits 3 from inside uvicorn."""
    app = Router(options)
    server = DrainingServer(
        server_config(options, app, log_config=logs.logging_config(options.log_level)), options
    )
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1


def supervise(options: config.Config) -> int:
    """`--workers N`: N processes accept from one socket, each with its own pod cache,
    counter and upstream pool. SIGTERM is passed on to each, and each drains; if one
    worker dies, the others are stopped too, so the pod restarts whole."""
    sock = bind(options.host, options.port, options.backlog)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(options, sock), name=f"worker-{index}")
        for index in range(options.workers)
    ]
    stopping = False

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the workers directly
    # A SIGTERM while workers start waits until every one has a PID to pass it on to.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    for worker in workers:
        worker.start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    host, port = sock.getsockname()[:2]
    log.info("running on http://%s:%d with %d workers", host, port, len(workers))
    running = list(workers)
    while running:
        multiprocessing.connection.wait([worker.sentinel for worker in running])
        for worker in [w for w in running if w.exitcode is not None]:
            running.remove(worker)
            if not stopping:
                log.error("%s exited with %s; stopping the others", worker.name, worker.exitcode)
                forward(signal.SIGTERM, None)
    sock.close()
    return int(any(worker.exitcode for worker in workers))


def _worker(options: config.Config, sock: socket.socket) -> None:
    logging.config.dictConfig(logs.logging_config(options.log_level))
    raise SystemExit(serve(options, sock))
