"""Every option of the command line: defaults, environment variables, validation, `--help`.

Each option is a flag and an environment variable `ROUTER_<NAME>`; the flag wins. A bad
value stops start-up with one line naming the option and the accepted form (exit 2), so
a typo in a Deployment never turns into a traceback in a crash loop.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from router.limits import UPGRADE_MAX_FLOOR

DEFAULT_SELECTOR = "agents.x-k8s.io/warm-pool-sandbox"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
AUTHZ_MODES = ("allow-all", "bearer", "tokenreview", "scoped-token")

_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """An option value that cannot be used; the message is the whole user-facing line."""


@dataclass(frozen=True)
class StaticPod:
    """One `NAME=HOST:PORT` entry of `--pods`."""

    name: str
    host: str
    port: int


@dataclass(frozen=True)
class Config:
    """The validated options; the one object every other module is configured from."""

    host: str = "0.0.0.0"
    port: int = 8080
    pods: tuple[StaticPod, ...] = ()
    demo: int = 0
    namespace: str = "default"
    all_namespaces: bool = False
    selector: str = DEFAULT_SELECTOR
    warm_pool: str | None = None
    pod_port: int = 8888
    kubeconfig: str | None = None
    cache_ttl: float = 3.0
    max_stale: float = 0.0
    max_attempts: int = 0
    retry_body_limit: int = 1024 * 1024
    retry_body_budget: int = 64 * 1024 * 1024
    max_body_size: int = 0  # no limit: bodies of hundreds of MiB must stream through
    proxy_timeout: float = 180.0
    connect_timeout: float = 5.0
    cluster_domain: str = "cluster.local"
    metrics_port: int = 9090
    allow_loopback_pod_ip: bool = False
    pod_cidr: tuple[Network, ...] = ()
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    max_request_head: int = 32 * 1024
    max_response_head: int = 64 * 1024
    shutdown_timeout: float = 30.0
    drain_grace: float = 5.0
    log_level: str = "info"
    access_log: bool = True
    limit_concurrency: int = 0
    backlog: int = 2048
    timeout_keep_alive: float = 5.0
    workers: int = 1
    authz_mode: str = "allow-all"
    authz_bearer_token_file: str | None = None
    authz_tokenreview_ttl: float = 30.0
    authz_tokenreview_audiences: tuple[str, ...] = ()
    authz_scoped_token_secret_file: str | None = None
    upgrade_idle_timeout: float = 3600.0
    upgrade_max_lifetime: float = 86400.0
    upgrade_max: int | None = None  # None: from the descriptor limit, once it is raised
    upgrade_max_per_client: int = 64
    trusted_proxy_cidrs: tuple[Network, ...] = ()

    @property
    def static(self) -> bool:
        """True when the pool is fixed (`--pods` or `--demo`) and Kubernetes is not used."""
        return bool(self.pods) or self.demo > 0


# -- value parsers: each takes the raw text and returns the value or raises ConfigError --


def port_number(text: str, *, allow_zero: bool = True) -> int:
    low = 0 if allow_zero else 1
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not low <= value <= 65535:
        raise ConfigError(f"expected a port number {low}..65535, got {text!r}")
    return value


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise ConfigError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def _seconds(*, allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = value >= 0 if allow_zero else value > 0
        if not ok or value == float("inf"):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"expected a number of seconds {bound}, got {text!r}")
        return value

    return parse


def byte_size(text: str) -> int:
    """`1048576`, `512KiB`, `1MiB`, `2m`: binary units, as operators write them."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"expected a size such as 1048576, 512KiB or 1MiB, got {text!r}")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


def dns_label(text: str) -> str:
    if not _DNS_LABEL.match(text):
        raise ConfigError(f"expected a DNS-1123 label (a-z, 0-9, '-'), got {text!r}")
    return text


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ConfigError("expected a non-empty value")
    return text.strip()


def _host(text: str) -> str:
    text = text.strip()
    if not text or any(c in text for c in "/ ?#"):
        raise ConfigError(f"expected a host name or IP address, got {text!r}")
    return text


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ConfigError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.lower()


def _authz_mode(text: str) -> str:
    if text not in AUTHZ_MODES:
        raise ConfigError(f"expected one of {', '.join(AUTHZ_MODES)}, got {text!r}")
    return text


def _names(text: str) -> tuple[str, ...]:
    """`a,b`: comma-separated values, blanks dropped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"expected true/false (1/0, yes/no, on/off), got {text!r}")


def static_pods(text: str) -> tuple[StaticPod, ...]:
    """`NAME=HOST:PORT,...`; a bare `HOST:PORT` is named `pod-<index>`."""
    pods: list[StaticPod] = []
    for index, item in enumerate(part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, address = item.rpartition("=")
        name = name or f"pod-{index}"
        host, sep, port_text = address.rpartition(":")
        host = host.strip("[]")
        if not sep or not host:
            raise ConfigError(f"expected NAME=HOST:PORT or HOST:PORT, got {item!r}")
        try:
            dns_label(name)
        except ConfigError:
            raise ConfigError(f"pod name must be a DNS-1123 label, got {name!r}") from None
        pods.append(StaticPod(name, host, port_number(port_text, allow_zero=False)))
    if not pods:
        raise ConfigError("expected at least one NAME=HOST:PORT")
    names = [pod.name for pod in pods]
    if len(set(names)) != len(names):
        raise ConfigError(f"pod names must be unique, got {', '.join(names)}")
    return tuple(pods)


def cidrs(text: str) -> tuple[Network, ...]:
    """`10.244.0.0/16,fd00:10:244::/56`: comma-separated networks (host bits must be 0)."""
    networks: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError:
            raise ConfigError(f"expected CIDR,... such as 10.244.0.0/16, got {item!r}") from None
    return tuple(networks)


def _head_size(text: str) -> int:
    value = byte_size(text)
    if not 1024 <= value <= 16 * 1024 * 1024:
        raise ConfigError(f"expected a size from 1KiB to 16MiB, got {text!r}")
    return value


def _ip_or_host(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return _host(text)


@dataclass(frozen=True)
class _Option:
    field: str
    parse: Callable[[str], Any]
    help: str
    env_aliases: tuple[str, ...] = ()
    metavar: str | None = None
    flag: bool = False  # a switch: --x / --no-x

    @property
    def cli(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return "ROUTER_" + self.field.upper()


OPTIONS: tuple[_Option, ...] = (
    _Option("host", _ip_or_host, "address the proxy listens on"),
    _Option("port", port_number, "port the proxy listens on (0 = any free port)"),
    _Option(
        "pods",
        static_pods,
        "static pool, no Kubernetes: NAME=HOST:PORT,... (HOST:PORT alone is pod-0, pod-1, ...)",
        metavar="NAME=HOST:PORT,...",
    ),
    _Option("demo", _whole(1), "start N demo sandbox servers on loopback and route to them",
            metavar="N"),
    _Option("namespace", dns_label,
            "namespace of the warm-pool pods (and of the sandboxes pinned requests find)"),
    _Option("all_namespaces", _boolean,
            "pinned requests find sandboxes of every namespace (the pool stays in "
            "--namespace; needs the all-namespaces ClusterRole)", flag=True),
    _Option("selector", _non_empty, "label selector of the warm-pool pods"),
    _Option("warm_pool", _non_empty,
            "select one SandboxWarmPool by name (FNV-1a hash label, as the controller stamps)",
            metavar="NAME"),
    _Option("pod_port", lambda t: port_number(t, allow_zero=False),
            "port of the sandbox server in each pod"),
    _Option("kubeconfig", _non_empty, "kubeconfig file (default: KUBECONFIG, else in-cluster)",
            env_aliases=("KUBECONFIG",), metavar="PATH"),
    _Option("cache_ttl", _seconds(allow_zero=False),
            "the pod list served is never older than this while the API answers (s)"),
    _Option("max_stale", _seconds(allow_zero=True),
            "with the API unreachable, fail /ready once the list is this old (s; 0 = never)"),
    _Option("max_attempts", _whole(0), "pool attempts per request (0 = every pod once)"),
    _Option("retry_body_limit", byte_size,
            "request bodies up to this size are kept so a busy pod can be retried",
            metavar="SIZE"),
    _Option("retry_body_budget", byte_size,
            "bodies kept for a retry, all requests together, at most; past it a body "
            "streams (0 = no bound)", metavar="SIZE"),
    _Option("proxy_timeout", _seconds(allow_zero=False), "per-request upstream timeout (s)",
            env_aliases=("PROXY_TIMEOUT_SECONDS",)),
    _Option("connect_timeout", _seconds(allow_zero=False), "per-attempt connect timeout (s)"),
    _Option("cluster_domain", _host, "cluster domain for the DNS form of pinned targets",
            env_aliases=("CLUSTER_DOMAIN",)),
    _Option("metrics_port", port_number, "port of the Prometheus /metrics endpoint (0 = off)"),
    _Option("allow_loopback_pod_ip", _boolean,
            "accept a loopback X-Sandbox-Pod-IP (sidecar use, tests)", flag=True),
    _Option("pod_cidr", cidrs,
            "networks a pinned X-Sandbox-Pod-IP (or DNS answer) may reach besides known pods",
            metavar="CIDR,..."),
    _Option("header_timeout", _seconds(allow_zero=True),
            "a client must send a whole request head within this (s; 408; 0 = off)"),
    _Option("body_timeout", _seconds(allow_zero=True),
            "longest wait between two reads of a request body (s; 408; 0 = off)"),
    _Option("send_timeout", _seconds(allow_zero=True),
            "longest a client may leave the router's writes unread (s; then closed; 0 = off)"),
    _Option("max_body_size", byte_size,
            "request bodies above this are refused (413; 0 = no limit: large uploads stream)",
            metavar="SIZE"),
    _Option("max_request_head", _head_size,
            "request line plus headers, at most (414 / 431 above it)", metavar="SIZE"),
    _Option("max_response_head", _head_size,
            "a pod's status line plus headers, at most (502 above it)", metavar="SIZE"),
    _Option("shutdown_timeout", _seconds(allow_zero=True),
            "on SIGTERM, time to finish in-flight requests, grace window included (s)"),
    _Option("drain_grace", _seconds(allow_zero=True),
            "on SIGTERM, keep accepting this long with /ready failing, so endpoints move "
            "away first (s)"),
    _Option("log_level", _log_level, "log level: " + ", ".join(LOG_LEVELS)),
    _Option("access_log", _boolean, "one JSON line per proxied request on stdout", flag=True),
    _Option("limit_concurrency", _whole(0),
            "answer 503 above this many open connections and tasks (0 = unlimited)"),
    _Option("backlog", _whole(1), "listen backlog"),
    _Option("timeout_keep_alive", _seconds(allow_zero=False),
            "close idle client keep-alive connections after this long (s)"),
    _Option("workers", _whole(1), "worker processes (each keeps its own pod cache and counter)"),
    _Option("authz_mode", _authz_mode,
            "who may use the proxy: " + ", ".join(AUTHZ_MODES) + " (probes never need it)"),
    _Option("authz_bearer_token_file", _non_empty,
            "--authz-mode bearer: accepted tokens, one per line (re-read when it changes)",
            metavar="PATH"),
    _Option("authz_tokenreview_ttl", _seconds(allow_zero=False),
            "--authz-mode tokenreview: how long a TokenReview answer is cached (s)"),
    _Option("authz_tokenreview_audiences", _names,
            "--authz-mode tokenreview: audiences the token must carry (spec.audiences)",
            metavar="AUD,..."),
    _Option("authz_scoped_token_secret_file", _non_empty,
            "--authz-mode scoped-token: the HMAC secret (at least 32 bytes, trimmed)",
            metavar="PATH"),
    _Option("upgrade_idle_timeout", _seconds(allow_zero=True),
            "close an upgraded connection (WebSocket) after this long with no bytes either "
            "way (s; 0 = off)"),
    _Option("upgrade_max_lifetime", _seconds(allow_zero=True),
            "close an upgraded connection this long after its 101 (s; 0 = off)"),
    _Option("upgrade_max", _whole(0),
            "upgraded connections (and handshakes under way) this process may hold in all "
            "(503 above; per worker; 0 = off)"),
    _Option("upgrade_max_per_client", _whole(0),
            "upgraded connections one client address may hold open "
            "(429 above; 0 = off)"),
    _Option("trusted_proxy_cidrs", cidrs,
            "proxies believed about their clients: X-Forwarded-For (right-most untrusted "
            "hop), X-Forwarded-Proto/-Host, Forwarded, X-Real-IP",
            metavar="CIDR,..."),
)


def _default_namespace(kubeconfig: str | None) -> str:
    """The namespace of the cluster the router talks to: with a kubeconfig, its current
    context's (as kubectl does); else the pod's own; else `default`. Read before the event
    loop starts (files only, no API call)."""
    if kubeconfig:
        namespace = _context_namespace(kubeconfig)
        if namespace:
            return namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def _context_namespace(kubeconfig: str) -> str | None:
    """The current context's namespace in a kubeconfig (a `KUBECONFIG` list of files is
    merged as kubectl merges it: the first file to set a value wins). A file that cannot
    be read is skipped here: loading the client reports it, with the option named."""
    import yaml

    current: str | None = None
    contexts: dict[str, Any] = {}
    for path in filter(None, kubeconfig.split(os.pathsep)):
        try:
            with open(path, encoding="utf-8") as file:
                document = yaml.safe_load(file)
        except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
            continue
        if not isinstance(document, dict):
            continue
        current = current or document.get("current-context")
        for entry in document.get("contexts") or ():
            if isinstance(entry, dict) and isinstance(entry.get("context"), dict):
                contexts.setdefault(str(entry.get("name")), entry["context"])
    namespace = (contexts.get(current) or {}).get("namespace") if current else None
    return namespace if isinstance(namespace, str) and _DNS_LABEL.match(namespace) else None


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as the contract promises."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="warmpool-router",
        description="Streaming HTTP reverse proxy in front of a warm pool of sandbox pods.",
        epilog="Every option is also an environment variable ROUTER_<NAME>; the flag wins.",
        argument_default=argparse.SUPPRESS,
    )
    defaults = Config()
    for option in OPTIONS:
        default = getattr(defaults, option.field)
        envs = ", ".join((option.env, *option.env_aliases))
        shown = default
        if option.field in {"pods", "demo", "warm_pool", "kubeconfig", "authz_bearer_token_file",
                            "authz_scoped_token_secret_file"}:
            shown = "unset"
        elif option.field == "namespace":
            shown = "the kubeconfig context's, else own namespace, else default"
        elif option.field in {"pod_cidr", "authz_tokenreview_audiences", "trusted_proxy_cidrs"}:
            shown = "none"
        elif option.field == "upgrade_max":
            shown = f"a quarter of the descriptor limit, at least {UPGRADE_MAX_FLOOR}"
        help_text = f"{option.help} [default: {shown}; env: {envs}]"
        if option.flag:
            parser.add_argument(option.cli, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(option.cli, type=_argparse_type(option), help=help_text,
                                metavar=option.metavar or option.field.upper())
    return parser


def _argparse_type(option: _Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return option.parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = option.field
    return convert


def load(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Flags over `ROUTER_*` variables over legacy variables over defaults; exits 2 on error."""
    env = os.environ if env is None else env
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.field in flags:
            values[option.field] = flags[option.field]
            continue
        for name in (option.env, *option.env_aliases):
            raw = env.get(name)
            if raw is None or (raw == "" and name in option.env_aliases):
                continue
            try:
                values[option.field] = option.parse(raw)
            except ConfigError as exc:
                parser.error(f"{name} (for {option.cli}): {exc}")
            break
    if "namespace" not in values:
        kubeconfig = None if values.get("pods") or values.get("demo") else values.get("kubeconfig")
        values["namespace"] = _default_namespace(kubeconfig)
    try:
        return validate(Config(**values))
    except ConfigError as exc:
        parser.error(str(exc))


def validate(config: Config) -> Config:
    """Checks that span several options."""
    if config.pods and config.demo:
        raise ConfigError("--pods and --demo cannot be used together")
    if config.warm_pool and config.selector != DEFAULT_SELECTOR:
        raise ConfigError("--warm-pool and --selector cannot be used together")
    if config.all_namespaces and config.static:
        raise ConfigError("--all-namespaces indexes the Kubernetes API's sandboxes: not with "
                          "--pods or --demo")
    if config.metrics_port and config.metrics_port == config.port:
        raise ConfigError("--metrics-port must differ from --port")
    _validate_authz(config)
    return config


# The file each mode reads; a file given for another mode is a mistake that would leave the
# router open (e.g. the token file set, the mode forgotten), so it stops start-up too.
_AUTHZ_FILES = {"bearer": "authz_bearer_token_file",
                "scoped-token": "authz_scoped_token_secret_file"}


def _validate_authz(config: Config) -> None:
    for mode, field in _AUTHZ_FILES.items():
        flag = "--" + field.replace("_", "-")
        given = getattr(config, field) is not None
        if config.authz_mode == mode and not given:
            raise ConfigError(f"--authz-mode {mode} needs {flag}")
        if given and config.authz_mode != mode:
            raise ConfigError(f"{flag} is only used with --authz-mode {mode}")


def main_error(message: str) -> NoReturn:
    """Exit with the same one-line form as a bad option."""
    sys.stderr.write(f"warmpool-router: error: {message}\n")
    raise SystemExit(2)

