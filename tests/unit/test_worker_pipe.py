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
    fallback_imports, native_unwraps, cache_hits, cache_misses = 1, 2, 3, 4


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
        ("stats", {"fallback_imports": 1, "native_unwraps": 2, "cache_hits": 3, "cache_misses": 4}),
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
