"""The `warmpool-router` command (also `python -m router`)."""

from __future__ import annotations

import logging.config
import sys
from collections.abc import Sequence

from router import authz, config, logs
from router.run import serve, supervise


def main(argv: Sequence[str] | None = None) -> None:
    options = config.load(sys.argv[1:] if argv is None else argv)
    logging.config.dictConfig(logs.logging_config(options.log_level))
    if not options.static or options.authz_mode == "tokenreview":
        check_kubernetes(options)
    try:
        authz.check_files(options)
    except config.ConfigError as exc:
        config.main_error(str(exc))
    raise SystemExit(serve(options) if options.workers == 1 else supervise(options))


def check_kubernetes(options: config.Config) -> None:
    """A missing or broken kubeconfig is a start-up error (exit 2, one line), not a router
    that never turns ready."""
    from router.kube import connect

    try:
        connect(options)  # nothing is sent: this only reads and parses the config
    except config.ConfigError as exc:
        config.main_error(str(exc))


if __name__ == "__main__":
    main()
