"""The `warmpool-router` command (also `python -m router`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from router import config, server


def main(argv: Sequence[str] | None = None) -> None:
    options = config.load(sys.argv[1:] if argv is None else argv)
    level = 5 if options.log_level == "trace" else options.log_level.upper()
    logging.basicConfig(level=level)
    if not (options.pods or options.demo):
        check_kubernetes(options)
    if not server.run(options):
        raise SystemExit(1)


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
