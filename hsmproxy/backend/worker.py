"""The node worker process: owns one PKCS#11 module and session, runs operations in batches.

Protocol on the pipe (multiprocessing Connection, pickled tuples):

* worker -> front, once: ``("ready", info_dict)`` or ``("failed", reason)``;
* front -> worker: a list of ``(request_id, op_name, args)``; ``None`` asks the worker to stop;
  ``"stats"`` asks for its counters (answered ``("stats", dict)``);
* worker -> front: a list of ``(request_id, error_code, values)`` in the same order; the lists of
  messages read in one wake-up are run and answered as one.

Each message is a 4-byte big-endian length and a pickle, as multiprocessing's Connection frames them.

``error_code`` ``"DEVICE"`` means the node failed (token gone, module error): the front marks the
node down and retries the request on another node. Values never hold key bytes.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import pkcs11

from hsmproxy.backend.errors import BackendError, DeviceError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.backend.spec import DEVICE_ERROR, NodeSpec
from hsmproxy.ops import load_all
from hsmproxy.ops.registry import OPS

#: Bytes asked per read of the pipe (below glibc's mmap threshold: a heap allocation per read).
READ_SIZE = 1 << 16
_LENGTH = struct.Struct("!i")


def run_batch(
    backend: Pkcs11Backend, batch: list[tuple[int, str, dict[str, Any]]]
) -> list[tuple[int, str, Any]]:
    """Run every operation of a batch; one failing operation never affects the others."""
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
    # The front owns shutdown: a SIGTERM or SIGINT sent to the whole process group (systemd's default
    # KillMode, `timeout`, Ctrl-C) must not kill a worker while the front drains through it. A worker
    # whose front is gone sees the pipe close and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    load_all()  # every operation registers itself in OPS
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
        serve(backend, conn.fileno(), spec.read_pin)
    finally:
        backend.close()
        conn.close()


def serve(backend: Pkcs11Backend, fd: int, read_pin: Callable[[], str] | None = None) -> None:
    """Answer the front on pipe ``fd`` until it sends ``None`` or closes.

    Every message that has arrived is read at once (one read, not two per message as
    multiprocessing's ``recv`` does) and the operations of all of them run as one batch with one
    reply: under load the batches grow and the front wakes once per batch, not per message.
    Between batches the module is re-initialised when :meth:`Pkcs11Backend.reinit_due` says so
    (``read_pin`` gives the PIN again; without it, never).
    """
    buf = bytearray()
    while True:
        try:
            chunk = os.read(fd, READ_SIZE)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk
        batch: list[tuple[int, str, dict[str, Any]]] = []
        stop = False
        while len(buf) >= 4:
            (n,) = _LENGTH.unpack_from(buf)
            if len(buf) < 4 + n:
                break
            message = pickle.loads(bytes(buf[4 : 4 + n]))  # noqa: S301 - from our own front process
            del buf[: 4 + n]
            if message is None:
                stop = True
                break
            if message == "stats":
                stats = {
                    "fallback_imports": backend.fallback_imports, "native_unwraps": backend.native_unwraps,
                    "cache_hits": backend.cache_hits, "cache_misses": backend.cache_misses,
                    "module_reinits": backend.module_reinits,
                }  # fmt: skip
                _send(fd, ("stats", stats))
            else:
                batch.extend(message)
        if batch:
            _send(fd, run_batch(backend, batch))
        if stop:
            return
        if read_pin is not None and backend.reinit_due():
            backend.reinitialize(read_pin())


def _send(fd: int, message: Any) -> None:
    """One length-prefixed pickle, as multiprocessing's Connection frames it (the front reads that)."""
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]
