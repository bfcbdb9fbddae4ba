"""Process entry for ``hsmproxy serve``: config, event loop (uvloop), exit code."""

from __future__ import annotations

import asyncio
import logging
import sys

from hsmproxy.config import ConfigError, load_settings
from hsmproxy.server.app import serve

log = logging.getLogger("hsmproxy")


def run_serve(config_path: str) -> int:
    """Load the config and serve until SIGTERM/SIGINT or a console SHUTDOWN (SIGHUP reloads);
    0 on a clean stop (drained), 1 on a config error."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:  # a value of the wrong type the parser did not word
        print(f"config error: {config_path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            import uvloop

            uvloop.run(serve(settings))
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            asyncio.run(serve(settings))
    except ConfigError as exc:  # found while starting (e.g. a pinned-keys file that is not there)
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    return 0
