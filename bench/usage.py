"""What a proxy process costs over one cell: peak RSS and CPU seconds. RSS is sampled in a
thread every 20 ms, so the peak of a short transfer is seen, not just its end."""

from __future__ import annotations

import threading

import psutil

MIB = 1024 * 1024


class Usage:
    """`with Usage(pid) as usage:` around a cell; `pid=None` (the direct path) measures
    nothing and reports zeros."""

    def __init__(self, pid: int | None, interval: float = 0.02) -> None:
        self._process = psutil.Process(pid) if pid is not None else None
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
        assert self._process is not None
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def _sample(self) -> None:
        assert self._process is not None
        while True:
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> Usage:
        if self._process is not None:
            self._cpu_start = self._cpu()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._stop.set()
            self._thread.join()
            self.cpu_seconds = self._cpu() - self._cpu_start
