"""The `warmpool-router` command (also `python -m router`): one server process, or with
`--workers N` a supervisor of N of them sharing one listening socket."""

from __future__ import annotations

import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

from router import config, logs
from router.app import Router
from router.server import DrainingServer, bind, server_config

log = logging.getLogger("router.main")


def main(argv: Sequence[str] | None = None) -> None:
    options = config.load(sys.argv[1:] if argv is None else argv)
    logging.config.dictConfig(logs.logging_config(options.log_level))
    if not options.static:
        check_kubernetes(options)
    raise SystemExit(serve(options) if options.workers == 1 else supervise(options))


def check_kubernetes(options: config.Config) -> None:
    """A missing or broken kubeconfig is a start-up error (exit 2, one line), not a router
    that never turns ready."""
    from router.kube import connect

    try:
        connect(options)  # nothing is sent: this only reads and parses the config
    except config.ConfigError as exc:
        config.main_error(str(exc))


def serve(options: config.Config, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM (drained: exit 0) or SIGINT; 1 if the server could not start."""
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
    for worker in workers:
        worker.start()
    log.info("started %d workers on %s:%d", len(workers), *sock.getsockname()[:2])
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


if __name__ == "__main__":
    main()
