"""Operation registry: op name -> function(backend, args) -> (error code, response values).

Operations run inside node workers against :class:`~hsmproxy.backend.pkcs11_backend.Pkcs11Backend`
primitives. Arguments and results are plain picklable values; results never carry key bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hsmproxy.backend.pkcs11_backend import Pkcs11Backend

OpResult = tuple[str, dict[str, str | bytes]]
Operation = Callable[[Pkcs11Backend, dict[str, Any]], OpResult]

OPS: dict[str, Operation] = {}


def op(name: str) -> Callable[[Operation], Operation]:
    """Register an operation under ``name``."""

    def register(fn: Operation) -> Operation:
        OPS[name] = fn
        return fn

    return register
