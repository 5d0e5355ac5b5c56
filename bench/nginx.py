"""nginx in two roles: the pods (static answers that are never the bottleneck) and the
reference round-robin proxy. Each instance runs in the foreground as our child, with its
config, pid file, logs and temp files in its own directory, so nothing outside the run's
temp directory is touched.

One process each (`master_process off`): the router is one Python process, so one nginx
worker is the fair comparison, and one PID is what the bench samples and stops.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Child, fetch

SMALL_BODY = b"x" * 99 + b"\n"
BIG_SIZE = 64 * 1024 * 1024
STATUS_PATH = "/nginx_status"

_MAIN = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # Connections live as long as the run: a reconnect must be the proxy's doing, not
    # nginx's default 1,000 requests per connection.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{servers}
}}
"""

# `/upload` reads the whole body into memory before answering (`return` alone would answer
# early and discard the body as it comes); the body is not sent on to the sink.
_POD = """\
    server {{
        listen {host}:{port} backlog=4096;
        sendfile on;
        tcp_nopush on;
        location = / {{ return 200 "{small}"; }}
        location = /big {{ alias {big}; }}
        location = /upload {{
            client_max_body_size 0;
            client_body_buffer_size 65m;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://unix:{dir}/sink.sock:/;
        }}
        location = {status} {{ stub_status; }}
    }}
    server {{
        listen unix:{dir}/sink.sock;
        location / {{ return 200 "uploaded\\n"; }}
    }}
"""

# A pod that is always busy: every path but the status page answers 503.
_BUSY_POD = """\
    server {{
        listen {host}:{port} backlog=4096;
        location / {{ return 503 "busy\\n"; }}
        location = {status} {{ stub_status; }}
    }}
"""

# The reference proxy: pooled keep-alive upstream connections, the next pod on 503 or a
# failed connect, default proxy buffers.
_PROXY = """\
    upstream pods {{
{servers}
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://pods;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_503;
            client_max_body_size 0;
        }}
    }}
"""

# The reference for upgraded connections (bench/websocket.py): nginx's documented
# WebSocket proxying, `Connection: upgrade` only when the client asked for one.
_WS_PROXY = """\
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        "" close;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://{pod};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 3600s;
        }}
    }}
"""


@dataclass(frozen=True)
class Pod:
    name: str
    host: str
    port: int
    busy: bool = False
    dead: bool = False  # nothing listens: every connect is refused

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def make_big_file(path: Path, size: int = BIG_SIZE) -> Path:
    """The download body, written once: random bytes, so nothing on the way can shrink it."""
    block = os.urandom(1024 * 1024)
    with path.open("wb") as out:
        for _ in range(size // len(block)):
            out.write(block)
    return path


def _write_config(directory: Path, servers: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(_MAIN.format(dir=directory, servers=servers))
    return config


def _start(name: str, directory: Path, config: Path, ready_url: str) -> Child:
    argv = ["nginx", "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]
    child = Child(name, argv, directory / "stderr.log")
    try:
        child.wait_ready(ready_url)
    except BaseException:
        child.stop()
        raise
    return child


def start_pod(pod: Pod, workdir: Path, big: Path) -> Child:
    directory = workdir / pod.name
    template = _BUSY_POD if pod.busy else _POD
    servers = template.format(
        host=pod.host,
        port=pod.port,
        small=SMALL_BODY.decode().replace("\n", "\\n"),
        big=big,
        dir=directory,
        status=STATUS_PATH,
    )
    return _start(pod.name, directory, _write_config(directory, servers), pod.url + STATUS_PATH)


def start_proxy(
    name: str, workdir: Path, pods: Sequence[Pod], port: int, max_fails: int | None = None,
    fail_timeout: str | None = None,
) -> Child:
    """`max_fails=None` keeps nginx's default (1 failure takes a pod out for 10 s); a failure
    is what `proxy_next_upstream` lists (a 503 included) besides errors and timeouts."""
    fails = "" if max_fails is None else f" max_fails={max_fails}"
    if fail_timeout is not None:
        fails += f" fail_timeout={fail_timeout}"
    upstreams = "\n".join(f"        server {p.host}:{p.port}{fails};" for p in pods)
    directory = workdir / name
    servers = _PROXY.format(servers=upstreams, host="127.0.0.1", port=port)
    # The proxy has no status page of its own: ready once it relays a pod's.
    return _start(name, directory, _write_config(directory, servers),
                  f"http://127.0.0.1:{port}{STATUS_PATH}")


_STATUS = re.compile(rb"server accepts handled requests\s+(\d+)\s+\d+\s+(\d+)")


@dataclass(frozen=True)
class Tally:
    """What the pods have counted so far: connections accepted (all pods) and requests
    answered by the pods that are not always busy (each client request ends at one)."""

    accepts: int
    requests: int

    def since(self, earlier: Tally, pods: Sequence[Pod]) -> Tally:
        """The difference; each `tally` read is itself one connection and one request on
        every pod, so a difference of two reads counts one of each too many per pod."""
        live = [pod for pod in pods if not pod.dead]
        return Tally(self.accepts - earlier.accepts - len(live),
                     self.requests - earlier.requests - sum(not pod.busy for pod in live))


def tally(pods: Sequence[Pod]) -> Tally:
    """The live pods' counts (a dead pod has none to give)."""
    accepts = requests = 0
    for pod in (pod for pod in pods if not pod.dead):
        status, body = fetch(pod.url + STATUS_PATH)
        match = _STATUS.search(body)
        if status != 200 or match is None:
            raise RuntimeError(f"{pod.name}: no stub_status ({status})")
        accepts += int(match.group(1))
        if not pod.busy:
            requests += int(match.group(2))
    return Tally(accepts, requests)


def start_websocket_proxy(name: str, workdir: Path, pod: Pod, port: int) -> Child:
    """nginx proxying WebSocket (and any upgrade) to one pod; ready once it relays the
    pod's answer to a plain GET of `/`."""
    directory = workdir / name
    servers = _WS_PROXY.format(host="127.0.0.1", port=port, pod=f"{pod.host}:{pod.port}")
    return _start(name, directory, _write_config(directory, servers), f"http://127.0.0.1:{port}/")
