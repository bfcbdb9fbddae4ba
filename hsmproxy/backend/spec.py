"""What the front knows about a node, and the worker entry point it spawns.

This module is all the front process imports of the backend: it never imports python-pkcs11 or
loads a PKCS#11 library. The worker process imports :mod:`hsmproxy.backend.worker` itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from hsmproxy.backend.errors import DeviceError

#: Error code a worker returns when the device failed (the request is retried elsewhere).
DEVICE_ERROR = "DEVICE"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """Everything a worker needs to open its node (the PIN is read from file or env here)."""

    name: str
    module: str
    token_label: str
    pin_file: str = ""
    pin_env: str = ""
    env: dict[str, str] = field(default_factory=dict)
    strict_key_custody: bool = False
    cache_size: int = 4096

    def read_pin(self) -> str:
        """The user PIN, from ``pin_file`` or the ``pin_env`` variable."""
        if self.pin_file:
            with open(self.pin_file, encoding="utf-8") as fh:
                return fh.read().strip()
        if self.pin_env:
            value = os.environ.get(self.pin_env)
            if value:
                return value
        raise DeviceError(f"node {self.name}: no PIN (set pin_file or pin_env)")


def run_worker(spec: NodeSpec, conn: Connection) -> None:
    """Process target of a node worker: import the PKCS#11 side only in the child."""
    from hsmproxy.backend.worker import worker_main

    worker_main(spec, conn)
