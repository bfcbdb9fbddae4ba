"""The node worker process: owns one PKCS#11 module and session, runs operations in batches.

Protocol on the pipe (multiprocessing Connection, pickled tuples):

* worker -> front, once: ``("ready", info_dict)`` or ``("failed", reason)``;
* front -> worker: a list of ``(request_id, op_name, args)``; ``None`` asks the worker to stop;
* worker -> front: a list of ``(request_id, error_code, values)`` in the same order.

``error_code`` ``"DEVICE"`` means the node failed (token gone, module error): the front marks the
node down and retries the request on another node. Values never hold key bytes.
"""

from __future__ import annotations

import os
import signal
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import pkcs11

from hsmproxy.backend.errors import BackendError, DeviceError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.backend.spec import DEVICE_ERROR, NodeSpec


def run_batch(
    backend: Pkcs11Backend, batch: list[tuple[int, str, dict[str, Any]]]
) -> list[tuple[int, str, Any]]:
    """Run every operation of a batch; one failing operation never affects the others."""
    from hsmproxy.ops import load_all
    from hsmproxy.ops.registry import OPS

    load_all()
    out: list[tuple[int, str, Any]] = []
    for request_id, name, args in batch:
        fn = OPS.get(name)
        if fn is None:
            out.append((request_id, "68", {}))
            continue
        try:
            code, values = fn(backend, args)
        except BackendError as exc:
            code, values = exc.code, {}
        except (
            DeviceError,
            pkcs11.exceptions.DeviceRemoved,
            pkcs11.exceptions.TokenNotPresent,
            pkcs11.exceptions.SessionHandleInvalid,
            pkcs11.exceptions.DeviceError,
            # The token's objects vanished under the session (token removed or re-initialised):
            # a device fault, retried on another node, not a business answer.
            pkcs11.exceptions.ObjectHandleInvalid,
            pkcs11.exceptions.KeyHandleInvalid,
        ):
            code, values = DEVICE_ERROR, {}
        except pkcs11.PKCS11Error:
            code, values = "42", {}
        except Exception:  # an op bug answers 41 and the worker keeps serving
            code, values = "41", {}
        out.append((request_id, code, values))
    return out


def worker_main(spec: NodeSpec, conn: Connection) -> None:
    """Entry point of a node worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front owns shutdown
    os.environ.update(spec.env)
    try:
        backend = Pkcs11Backend(
            spec.module,
            spec.token_label,
            spec.read_pin(),
            strict_key_custody=spec.strict_key_custody,
            cache_size=spec.cache_size,
        )
    except (DeviceError, OSError) as exc:
        conn.send(("failed", str(exc)))
        conn.close()
        return
    conn.send(("ready", {"pid": os.getpid(), **asdict(backend.info)}))
    try:
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                break
            if batch is None:
                break
            if batch == "stats":
                conn.send(
                    (
                        "stats",
                        {
                            "fallback_imports": backend.fallback_imports,
                            "cache_hits": backend.cache_hits, "native_unwraps": backend.native_unwraps,
                            "cache_misses": backend.cache_misses,
                        },
                    )
                )
                continue
            conn.send(run_batch(backend, batch))
    finally:
        backend.close()
        conn.close()
