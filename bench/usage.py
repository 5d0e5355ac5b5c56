"""What a proxy costs over one cell: peak RSS and CPU seconds of its process and its
children (`--workers N`: the supervisor and its workers, as they are when the cell starts),
read from /proc/PID/stat and statm by psutil. RSS is sampled in a thread every 20 ms, so
the peak of a short transfer is seen, not just its end."""

from __future__ import annotations

import threading

import psutil

MIB = 1024 * 1024


class Usage:
    """`with Usage(pid) as usage:` around a cell; `pid=None` (the direct path) measures
    nothing and reports zeros."""

    def __init__(self, pid: int | None, interval: float = 0.02) -> None:
        self._process = psutil.Process(pid) if pid is not None else None
        self._tree: list[psutil.Process] = []
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._cpu_start = 0.0
        self.cpu_seconds = 0.0
        self.peak_rss = 0

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss / MIB

    def _cpu(self) -> float:
        total = 0.0
        for process in self._tree:
            times = process.cpu_times()
            total += times.user + times.system
        return total

    def _sample(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in self._tree))
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> Usage:
        if self._process is not None:
            self._tree = [self._process, *self._process.children(recursive=True)]
            self._cpu_start = self._cpu()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._stop.set()
            self._thread.join()
            self.cpu_seconds = self._cpu() - self._cpu_start

