"""Process entry for ``hsmproxy serve``: config, event loop (uvloop), exit code."""

from __future__ import annotations

import asyncio
import logging
import sys

from hsmproxy.config import ConfigError, load_settings
from hsmproxy.server.app import serve

log = logging.getLogger("hsmproxy")


def run_serve(config_path: str) -> int:
    """Load the config and serve until SIGTERM; 0 on a clean stop, 1 on a config error."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(settings))
    return 0
