"""The `warmpool-router` command (also `python -m router`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from router import config as config_module
from router.app import Router
from router.config import Config


def server_config(config: Config, app: Router) -> uvicorn.Config:
    """uvicorn settings from our options. uvicorn's own access log, `Server` and `Date`
    headers are off, so the sandbox's headers pass unchanged; so is its proxy-headers
    rewrite, so the client address stays the peer's own."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_level=config.log_level,
        limit_concurrency=config.limit_concurrency or None,
        backlog=config.backlog,
        timeout_keep_alive=int(config.timeout_keep_alive),
        timeout_graceful_shutdown=int(config.shutdown_timeout),
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = config_module.load(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=config.log_level.upper() if config.log_level != "trace" else 5)
    server = uvicorn.Server(server_config(config, Router(config)))
    server.run()
    if not server.started:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
