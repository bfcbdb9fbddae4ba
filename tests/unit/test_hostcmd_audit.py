"""The host-command dispatcher as the audit point: what reached a node is one record (even when the
client is gone, or no answer came), what did not is counted, and ack_after_durable holds the answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from hsmproxy.cluster.router import REQUEST_NOTE, NoNodeAvailable, Router
from hsmproxy.commands import HANDLERS
from hsmproxy.commands.base import CommandContext
from hsmproxy.server.hostcmd import AuditItem, Dispatcher

NC = b"0001NC"
#: A node's answer to NC's lmk_check.
CHECKED = ("00", {"lmk_check": "0123456789ABCDEF", "firmware": "1000-E000"})
B2 = b"0002B20004ABCD"


class FakeRouter:
    """Answers every op on ``node`` with ``answer`` (or fails it), noting the node as the router does."""

    def __init__(self, node: str = "node-a", answer: tuple[str, Any] | None = ("00", {}), reach: bool = True):
        self.node, self.answer, self.reach = node, answer, reach
        self.futures: list[asyncio.Future[tuple[str, Any]]] = []
        self.ops: list[str] = []

    shed_early = 0

    def overloaded(self) -> bool:
        return False

    def submit(self, op: str, args: dict[str, Any], affinity: str = "") -> asyncio.Future[tuple[str, Any]]:
        fut: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        note = REQUEST_NOTE.get()
        self.ops.append(op)
        if not self.reach:
            fut.set_exception(NoNodeAvailable("shed"))
            return fut
        assert note is not None
        note.tried = self.node
        self.futures.append(fut)
        return fut

    def finish(self) -> None:
        for fut in self.futures:
            if self.answer is None:
                fut.set_exception(TimeoutError())
            else:
                fut.set_result(self.answer)
        self.futures.clear()


class FakeAudit:
    def __init__(self, ack: bool = False) -> None:
        self.ack_after_durable = ack
        self.items: list[AuditItem] = []
        self.refusals: list[tuple[str, str, str, str]] = []
        self.held: list[tuple[int, Callable[[], None]]] = []

    def hostcmd(self, item: AuditItem) -> int:
        self.items.append(item)
        return len(self.items)

    def refused(self, tenant: str, listener: str, command: str, result: str, count: int = 1) -> None:
        self.refusals += [(tenant, listener, command, result)] * count

    def when_durable(self, ticket: int, callback: Callable[[], None]) -> None:
        self.held.append((ticket, callback))


def _dispatcher(router: FakeRouter, audit: FakeAudit) -> Dispatcher:
    ctx = CommandContext("default", ("00",), "00")
    return Dispatcher(cast(Router, router), HANDLERS, ctx, 4, listener="host", audit=audit)


def test_answers_without_a_node_are_counted_and_node_answers_recorded() -> None:
    async def main() -> tuple[FakeAudit, bytes]:
        router, audit = FakeRouter(answer=CHECKED), FakeAudit()
        d = _dispatcher(router, audit)
        for _ in range(2):
            echo = d.handle(B2, "10.0.0.1:5")
            assert isinstance(echo, bytes) and echo[4:8] == b"B300"
        assert isinstance(d.handle(b"0003ZZ", "10.0.0.1:5"), bytes)  # unknown: 68 at once
        pending = d.handle(NC, "10.0.0.1:5")
        assert isinstance(pending, asyncio.Future)
        router.finish()
        return audit, await pending

    audit, answer = asyncio.run(main())
    assert answer[:8] == b"0001ND00"
    assert audit.refusals == [("default", "host", "B2", "00")] * 2 + [("default", "host", "ZZ", "68")]
    (item,) = audit.items
    assert item[:5] == ("host", "default", "10.0.0.1:5", "NC", "00") and item[6:] == (b"0001", "node-a", ())


def test_a_request_the_router_refused_before_any_node_is_only_counted() -> None:
    async def main() -> FakeAudit:
        audit = FakeAudit()
        answer = _dispatcher(FakeRouter(reach=False), audit).handle(NC, "c")
        assert isinstance(answer, asyncio.Future)
        assert (await answer)[4:8] == b"ND41"
        return audit

    audit = asyncio.run(main())
    assert audit.items == [] and audit.refusals == [("default", "host", "NC", "41")]


def test_a_request_sent_to_a_node_that_never_answered_is_recorded_with_that_node() -> None:
    async def main() -> FakeAudit:
        router, audit = FakeRouter(node="node-b", answer=None), FakeAudit()
        answer = _dispatcher(router, audit).handle(NC, "c")
        router.finish()
        assert isinstance(answer, asyncio.Future) and (await answer)[4:8] == b"ND41"
        return audit

    audit = asyncio.run(main())
    (item,) = audit.items  # it may have run on node-b: recorded, not counted
    assert (item[3], item[4], item[7]) == ("NC", "41", "node-b") and audit.refusals == []


def test_the_record_is_written_when_the_client_went_away_before_the_answer() -> None:
    async def main() -> FakeAudit:
        router, audit = FakeRouter(answer=CHECKED), FakeAudit()
        answer = _dispatcher(router, audit).handle(NC, "c")
        assert isinstance(answer, asyncio.Future)
        answer.cancel()  # the connection closed: its slots are cancelled
        router.finish()
        await asyncio.sleep(0)
        return audit

    assert len(asyncio.run(main()).items) == 1


def test_with_ack_after_durable_the_answer_waits_for_its_record() -> None:
    async def main() -> None:
        router, audit = FakeRouter(answer=CHECKED), FakeAudit(ack=True)
        answer = _dispatcher(router, audit).handle(NC, "c")
        assert isinstance(answer, asyncio.Future)
        router.finish()
        await asyncio.sleep(0)
        assert not answer.done() and [t for t, _ in audit.held] == [1]  # held for ticket 1
        audit.held[0][1]()  # the record is on disk
        assert answer.done() and answer.result()[4:8] == b"ND00"

    asyncio.run(main())


class OverloadedRouter(FakeRouter):
    """A router whose admission queue is past what it can start in time."""

    def overloaded(self) -> bool:
        return True


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.paused = 0

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 5000) if name == "peername" else None

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.paused -= 1

    def is_closing(self) -> bool:
        return False


def test_under_overload_a_read_is_answered_41_in_order_without_a_node_and_counted_in_bulk() -> None:
    from hsmproxy.server.hostcmd import HostCommandProtocol
    from protocols.framing import Framer, encode_frame

    async def main() -> tuple[list[bytes], OverloadedRouter, FakeAudit, _Transport]:
        router, audit = OverloadedRouter(), FakeAudit()
        proto = HostCommandProtocol(_dispatcher(router, audit))
        transport = _Transport()
        proto.connection_made(cast(Any, transport))
        frames = [b"0001NC", B2, b"0003CA0123\x19tail", b"0004NC"]
        proto.data_received(b"".join(encode_frame(f) for f in frames))
        assert transport.paused == 1  # read again in a moment, in one bigger read
        await asyncio.sleep(0.01)
        assert transport.paused == 0
        return Framer(65535).feed(transport.written), router, audit, transport

    answers, router, audit, _ = asyncio.run(main())
    # in request order; B2 (the keep-alive) still answered; the trailer kept; nothing sent to a node
    assert answers[0] == b"0001ND41" and answers[2:] == [b"0003CB41\x19tail", b"0004ND41"]
    assert answers[1][:8] == b"0002B300" and router.ops == []
    assert router.shed_early == 3
    assert (
        sorted(audit.refusals)
        == [("default", "host", "B2", "00"), ("default", "host", "CA", "41")]
        + [("default", "host", "NC", "41")] * 2
    )
