"""The worker's side of the pipe: messages read in one wake-up run as one batch with one reply."""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from typing import Any

import pytest

from hsmproxy.backend.worker import serve
from hsmproxy.ops.registry import OPS


class _Backend:
    fallback_imports, native_unwraps, cache_hits, cache_misses, module_reinits = 1, 2, 3, 4, 0


STATS = {"fallback_imports": 1, "native_unwraps": 2, "cache_hits": 3, "cache_misses": 4, "module_reinits": 0}


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message)
    return struct.pack("!i", len(data)) + data


def _replies(sock: socket.socket) -> list[Any]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    out = []
    while data:
        (n,) = struct.unpack_from("!i", data)
        out.append(pickle.loads(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


@pytest.fixture
def echo_op() -> Any:
    def echo(_backend: Any, args: dict[str, Any]) -> tuple[str, Any]:
        if args.get("fail"):
            raise RuntimeError("op bug")
        return "00", {"x": args["x"]}

    OPS["test_echo"] = echo
    yield
    del OPS["test_echo"]


def test_messages_that_arrived_together_are_one_batch_and_one_reply(echo_op: None) -> None:
    front, worker = socket.socketpair()
    try:
        front.sendall(
            _frame([(1, "test_echo", {"x": "a"}), (2, "no_such_op", {})])
            + _frame("stats")
            + _frame([(3, "test_echo", {"fail": True}), (4, "test_echo", {"x": "d"})])
            + _frame(None)
            + _frame([(5, "test_echo", {"x": "never"})])  # after the stop: not run
        )
        serve(_Backend(), worker.fileno())  # type: ignore[arg-type]
        worker.close()
        replies = _replies(front)
    finally:
        front.close()
    assert replies == [
        ("stats", STATS),
        [(1, "00", {"x": "a"}), (2, "68", {}), (3, "41", {}), (4, "00", {"x": "d"})],
    ]


def test_a_message_split_across_reads_waits_for_its_end(echo_op: None) -> None:
    front, worker = socket.socketpair()
    try:
        frame = _frame([(7, "test_echo", {"x": "z" * 100_000})])  # larger than one read
        front.sendall(frame[:3])
        t = threading.Thread(target=serve, args=(_Backend(), worker.fileno()))
        t.start()
        front.sendall(frame[3:] + _frame(None))
        t.join(10)
        assert not t.is_alive()
        worker.close()
        replies = _replies(front)
    finally:
        front.close()
    assert replies == [[(7, "00", {"x": "z" * 100_000})]]


class _ChurningBackend(_Backend):
    """Says a re-initialisation is due after its first batch; records the PINs it was given."""

    def __init__(self) -> None:
        self.batches = 0
        self.pins: list[str] = []

    def reinit_due(self) -> bool:
        return self.batches == 1 and not self.pins

    def reinitialize(self, pin: str) -> None:
        self.pins.append(pin)
        self.module_reinits += 1


def test_the_module_is_reinitialised_between_batches_when_due(echo_op: None) -> None:
    backend = _ChurningBackend()

    def counting(b: Any, args: dict[str, Any]) -> tuple[str, Any]:
        b.batches += 1
        return "00", {"reinits_so_far": b.module_reinits}

    OPS["test_count"] = counting
    front, worker = socket.socketpair()
    try:
        t = threading.Thread(target=serve, args=(backend, worker.fileno(), lambda: "1234"))
        t.start()
        front.sendall(_frame([(1, "test_count", {})]))
        first = _read_one(front)
        front.sendall(_frame([(2, "test_count", {})]) + _frame("stats") + _frame(None))
        t.join(10)
        assert not t.is_alive()
        worker.close()
        rest = _replies(front)
    finally:
        del OPS["test_count"]
        front.close()
    assert first == [(1, "00", {"reinits_so_far": 0})]
    assert rest[0] == ("stats", {**STATS, "module_reinits": 1})
    assert rest[1] == [(2, "00", {"reinits_so_far": 1})]  # after the first batch, once, before the second
    assert backend.pins == ["1234"]


@pytest.mark.parametrize("pin_source", [False, True])
def test_without_a_pin_source_the_module_is_never_reinitialised(echo_op: None, pin_source: bool) -> None:
    backend = _ChurningBackend()
    backend.batches = 1  # due from the start
    front, worker = socket.socketpair()
    try:
        read_pin = (lambda: "1234") if pin_source else None
        t = threading.Thread(target=serve, args=(backend, worker.fileno(), read_pin))
        t.start()
        front.sendall(_frame([(1, "test_echo", {"x": "a"})]))
        assert _read_one(front) == [(1, "00", {"x": "a"})]  # the check runs before the next read
        front.sendall(_frame(None))
        t.join(10)
        assert not t.is_alive()
        worker.close()
    finally:
        front.close()
    assert backend.pins == (["1234"] if pin_source else [])  # the same run with a PIN source does it


def _read_one(sock: socket.socket) -> Any:
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    (n,) = struct.unpack("!i", head)
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return pickle.loads(data)
