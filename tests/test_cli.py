"""The command line: options, environment variables, errors, and `--demo`."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from router import config
from router.config import Config, StaticPod
from router.server import bind
from tests.process import RouterProcess, run_router


def test_help_lists_every_option_with_its_environment_variable():
    result = run_router(["--help"])
    assert result.returncode == 0
    for option in config.OPTIONS:
        assert option.cli in result.stdout
        assert option.env in result.stdout


def test_every_option_is_a_config_field():
    assert {option.field for option in config.OPTIONS} == set(Config.__dataclass_fields__)


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--port", "http"], {}, "--port"),
        (["--port", "70000"], {}, "--port"),
        (["--pods", "a=nohost"], {}, "--pods"),
        (["--pods", "Bad_Name=127.0.0.1:80"], {}, "--pods"),
        (["--pods", "a=127.0.0.1:1,a=127.0.0.1:2"], {}, "--pods"),
        (["--retry-body-limit", "1XB"], {}, "--retry-body-limit"),
        (["--proxy-timeout", "0"], {}, "--proxy-timeout"),
        (["--demo", "0"], {}, "--demo"),
        (["--log-level", "loud"], {}, "--log-level"),
        ([], {"ROUTER_MAX_ATTEMPTS": "-1"}, "ROUTER_MAX_ATTEMPTS"),
        ([], {"PROXY_TIMEOUT_SECONDS": "never"}, "PROXY_TIMEOUT_SECONDS"),
        ([], {"ROUTER_ALLOW_LOOPBACK_POD_IP": "maybe"}, "ROUTER_ALLOW_LOOPBACK_POD_IP"),
        (["--pods", "127.0.0.1:1", "--demo", "2"], {}, "--demo"),
        (["--nonsense"], {}, "--nonsense"),
        (["--drain-grace", "soon"], {}, "--drain-grace"),
        (["--upgrade-max", "-1"], {}, "--upgrade-max"),
        ([], {"ROUTER_UPGRADE_MAX": "many"}, "ROUTER_UPGRADE_MAX"),
        (["--max-body-size", "-1"], {}, "--max-body-size"),
        ([], {"ROUTER_MAX_BODY_SIZE": "1 TiB"}, "ROUTER_MAX_BODY_SIZE"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_option(
    args: list[str], env: dict[str, str], names: str
):
    result = run_router(args, env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0]
    assert "Traceback" not in result.stderr


def test_flag_wins_over_environment_which_wins_over_legacy_variable():
    env = {"ROUTER_PROXY_TIMEOUT": "20", "PROXY_TIMEOUT_SECONDS": "30", "CLUSTER_DOMAIN": "c.x"}
    assert config.load([], env).proxy_timeout == 20
    assert config.load(["--proxy-timeout", "10"], env).proxy_timeout == 10
    assert config.load([], {"PROXY_TIMEOUT_SECONDS": "30"}).proxy_timeout == 30
    assert config.load([], env).cluster_domain == "c.x"


def test_options_parse_to_typed_values():
    loaded = config.load(
        ["--pods", "a=10.0.0.1:8888, 10.0.0.2:9000", "--retry-body-limit", "512KiB",
         "--allow-loopback-pod-ip", "--no-access-log"],
        {"ROUTER_MAX_ATTEMPTS": "2"},
    )
    assert loaded.pods == (StaticPod("a", "10.0.0.1", 8888), StaticPod("pod-1", "10.0.0.2", 9000))
    assert loaded.retry_body_limit == 512 * 1024
    assert loaded.allow_loopback_pod_ip is True
    assert loaded.access_log is False
    assert loaded.max_attempts == 2


def test_upgrade_max_is_derived_unless_given_and_0_is_no_limit():
    """As every limit here, 0 is none; unset, each process derives it from its descriptor
    limit (`router.limits.upgrade_max_default`), which `--help` says."""
    assert config.load([], {}).upgrade_max is None
    assert config.load([], {"ROUTER_UPGRADE_MAX": "500"}).upgrade_max == 500
    assert config.load(["--upgrade-max", "0"], {"ROUTER_UPGRADE_MAX": "500"}).upgrade_max == 0
    loaded = config.load(["--upgrade-max", "7", "--upgrade-max-per-client", "3"])
    assert (loaded.upgrade_max, loaded.upgrade_max_per_client) == (7, 3)
    shown = " ".join(run_router(["--help"]).stdout.split())
    assert "[default: a quarter of the descriptor limit, at least 16; env: ROUTER_UPGRADE_MAX]" \
        in shown


def test_max_body_size_takes_the_size_syntax_and_is_off_unless_given():
    """Off by default: 300 MiB bodies must stream through (docs/kubernetes.md)."""
    assert config.load([], {}).max_body_size == 0
    assert config.load(["--max-body-size", "10m"]).max_body_size == 10 * 1024 * 1024
    assert config.load([], {"ROUTER_MAX_BODY_SIZE": "512 KiB"}).max_body_size == 512 * 1024
    assert config.load(["--max-body-size", "0"], {"ROUTER_MAX_BODY_SIZE": "1g"}
                       ).max_body_size == 0


def test_demo_pool_serves_round_robin_out_of_the_box():
    router = RouterProcess(["--demo", "3"])
    try:
        with httpx.Client(base_url=router.url, timeout=10) as client:
            assert client.get("/ready").json() == {"status": "ready", "pods": 3}
            served = Counter(client.get("/").json()["pod"] for _ in range(30))
    finally:
        router.stop()
    assert served == {"demo-0": 10, "demo-1": 10, "demo-2": 10}


def test_a_metrics_port_in_use_stops_start_up_with_one_clear_line():
    taken = bind("127.0.0.1")
    port = taken.getsockname()[1]
    try:
        result = run_router(["--demo", "1", "--host", "127.0.0.1", "--port", "0",
                             "--metrics-port", str(port)])
    finally:
        taken.close()
    assert result.returncode == 3  # uvicorn's start-up failure
    assert f"--metrics-port {port}: cannot listen" in result.stderr
    assert "Traceback" not in result.stderr
