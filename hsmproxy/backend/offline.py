"""A node's token opened directly, outside the proxy (ceremonies, audit keys, verification).

Each call runs in a child process of its own (:func:`in_child`): a PKCS#11 library reads its
configuration (e.g. ``SOFTHSM2_CONF``) once per process, so two nodes with different module settings
cannot share one, and the parent never loads a PKCS#11 library at all.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import ParamSpec, TypeVar

from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.backend.spec import NodeSpec

P = ParamSpec("P")
R = TypeVar("R")


def open_backend(spec: NodeSpec) -> Pkcs11Backend:
    """Open and log in to ``spec``'s token in this process (its ``env`` applied first)."""
    os.environ.update(spec.env)
    return Pkcs11Backend(spec.module, spec.token_label, spec.read_pin())


def in_child(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``fn(*args)`` in a new (spawned) process and return its result (exceptions re-raised)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()
