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
    if not server.run(options):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
