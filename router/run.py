"""Running the router as a process: one server, or with `--workers N` a supervisor of N
server processes listening on one port. (Apart from `__main__` so that worker
processes, which are spawned, can import what they run.)"""

from __future__ import annotations

import gc
import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
from multiprocessing import resource_tracker
from multiprocessing.queues import SimpleQueue
from types import FrameType

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer

from router import config, logs, probes
from router.app import Router
from router.limits import raise_fd_limit
from router.metrics import Gathered, Metrics, serve_registry
from router.server import DrainingServer, bind, bind_group, server_config

log = logging.getLogger("router.run")


def serve(options: config.Config, sock: socket.socket | None = None,
          metrics: Metrics | None = None) -> int:
    """Serve until SIGTERM (drained: exit 0) or SIGINT. A start-up failure (a port in use)
    exits 3 from inside uvicorn. `sock`: a `--workers` process's, whose supervisor passes
    every stop signal on (`supervise`)."""
    raise_fd_limit()  # here, so that each `--workers` process raises its own
    app = Router(options, metrics=metrics)
    server = DrainingServer(
        server_config(options, app, log_config=logs.logging_config(options.log_level)), options,
        supervised=sock is not None,
    )
    _settle_heap()
    if sock is not None:
        # From here a stop signal is the server's: a drain (`DrainingServer.startup` marks
        # the app once it loads). One that came while the worker started was only noted.
        signal.signal(signal.SIGTERM, server.handle_exit)
        if _stop_noted:
            return 0  # nothing accepted yet, so nothing to drain: a clean stop
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1


YOUNG_THRESHOLD = 10_000
"""Allocations (less deallocations) of tracked objects between young collections."""


def _settle_heap() -> None:
    """What start-up built (modules, settings, the app) lives as long as the process, yet
    every full garbage collection walked all of it, while requests waited: moved out of
    the collector's sight, a collection walks only what requests allocate. Measured with
    the bench's pods at c=64: p99 from 12.5-13.5 ms down to 5.4-5.9 ms.

    The youngest generation's threshold is raised too. No exchange leaves cyclic garbage,
    answered or failed (refused connects, lost pods, timeouts, refused heads, clients
    gone, tunnels: `tests/test_upstream.py` and the freed-without-a-collection tests hold
    that), but the collector counts allocations less deallocations, and with hundreds of
    requests in flight one loop turn allocates thousands of objects that are freed only
    later: at the default 700 that alone set off a collection every ~30 requests at c=256,
    each walking, then promoting, the live objects of the requests in flight (about 19 µs
    per request, most of what c=256 cost more than c=16). At 10,000: none at c=64, a few
    per 100,000 requests at c=256. Raising it while failure paths still made cycles held
    their pod connections longer (the fault soak's descriptors climbed): the soak's flat
    descriptors and RSS are the check that none came back."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def supervise(options: config.Config) -> int:
    """`--workers N`: N processes, each accepting from its own socket on the port
    (`bind_group`) and with its own pod cache, counter and upstream pool; `/metrics` is
    served here, gathered from all of them. SIGTERM is passed on to each, and each
    drains; if one worker dies, the others are stopped too, so the pod restarts whole."""
    socks = bind_group(options.host, options.port, options.backlog, options.workers)
    context = multiprocessing.get_context("spawn")
    reports = context.SimpleQueue() if options.metrics_port else None
    workers = [
        context.Process(target=_worker, args=(options, index, sock, reports),
                        name=f"worker-{index}")
        for index, sock in enumerate(socks)
    ]
    stopping = False

    def forward(sig: int, frame: FrameType | None) -> None:
        """SIGTERM, or SIGINT (a terminal's Ctrl-C, which reaches the workers too, or a
        process manager's stop signal): each worker is told once, with SIGTERM, and
        drains. The workers ignore SIGINT (`_worker`), so a Ctrl-C is never a second
        signal that would cut their drain short."""
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # A signal while workers start waits until every one has a PID to pass it on to.
    # Threads started meanwhile (the metrics server's) keep it blocked, so it always
    # reaches this thread, the one waiting on the workers. multiprocessing's resource
    # tracker, started by the first spawn, unblocks both signals in its caller: started
    # first, it leaves the block alone.
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    metrics_server = _gather(options, reports) if reports is not None else None
    failed = False  # a worker could not start, or ended of its own: the pod must restart
    for worker in workers:
        try:
            worker.start()
        except OSError as exc:  # fork or exec failed (EMFILE, ENOMEM, EAGAIN ...)
            failed = True
            log.error("%s could not start (%s); stopping the others", worker.name, exc)
            break
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    listening = dict(zip(workers, socks, strict=True))
    running = [worker for worker in workers if worker.pid is not None]
    if failed:
        for worker in workers:
            if worker.pid is None:
                listening[worker].close()  # off the port: nobody would accept from it
        forward(signal.SIGTERM, None)
    else:
        host, port = socks[0].getsockname()[:2]
        log.info("running on http://%s:%d with %d workers", host, port, len(workers))
    while running:
        multiprocessing.connection.wait([worker.sentinel for worker in running])
        for worker in [w for w in running if w.exitcode is not None]:
            running.remove(worker)
            # Its socket leaves the port: held open here, it would still get its share of
            # new connections, which nobody accepts, while the others drain.
            listening[worker].close()
            if not stopping:
                log.error("%s exited with %s; stopping the others", worker.name, worker.exitcode)
                failed = True  # a clean exit of its own too
                forward(signal.SIGTERM, None)
    for sock in socks:
        sock.close()
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()
    return int(failed or any(worker.exitcode for worker in workers))


class WorkerPorts:
    """The loopback ports the workers serve their `/metrics` and probes on, in the order
    of the workers' numbers (`worker-N`, as their log lines are named), whatever order
    they started in: a probe's `worker N: ...` names the worker that failed."""

    def __init__(self, reports: SimpleQueue[tuple[int, int]]) -> None:
        self._reports = reports
        self._ports: dict[int, int] = {}
        self._reading = threading.Lock()  # scrapes and probes run in threads of their own

    def __call__(self) -> list[int]:
        with self._reading:
            while not self._reports.empty():
                index, port = self._reports.get()
                self._ports[index] = port
            return [self._ports[index] for index in sorted(self._ports)]


def _gather(options: config.Config,
            reports: SimpleQueue[tuple[int, int]]) -> ThreadingWSGIServer:
    """`/metrics` of the supervisor: every worker's, added up (`metrics.Gathered`); and
    `/healthz`, `/ready`: every worker's, all of which must pass (`probes.gathered`)."""
    worker_ports = WorkerPorts(reports)
    registry = CollectorRegistry()
    registry.register(Gathered(worker_ports))
    try:
        return serve_registry(registry, bind(options.host, options.metrics_port),
                              probes.gathered_routes(worker_ports, options.workers))
    except OSError as exc:
        config.main_error(f"--metrics-port {options.metrics_port}: cannot listen on "
                          f"{options.host}: {exc.strerror}")


_stop_noted: list[int] = []
"""The stop signals a starting worker got before its server took them over (`serve`)."""


def _stopped_before_serving(sig: int, frame: FrameType | None) -> None:
    """Noted, for `serve` to act on. A Python signal handler runs wherever the main thread
    is, finalizers and weakref callbacks included (a garbage collection runs them), and
    those print an exception they raise and drop it: a SystemExit raised here was lost
    so, and the worker went on to serve, never told again, its supervisor waiting on it."""
    _stop_noted.append(sig)


def _worker(options: config.Config, index: int, sock: socket.socket,
            reports: SimpleQueue[tuple[int, int]] | None) -> None:
    # A SIGTERM that came while we started (blocked meanwhile) or comes before the server
    # takes the signal over ends the worker cleanly before it serves, not by the default
    # action (exit -15, which the supervisor reports as a failure).
    signal.signal(signal.SIGTERM, _stopped_before_serving)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor passes it on as SIGTERM
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    logging.config.dictConfig(logs.logging_config(options.log_level))
    metrics = None
    if reports is not None:  # served on loopback for the supervisor to gather
        metrics = Metrics(options.proxy_timeout)
        metrics.serve(bind("127.0.0.1"))
        reports.put((index, metrics.port or 0))
    raise SystemExit(serve(options, sock, metrics))
