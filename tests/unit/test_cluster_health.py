"""Health checks (fall/rise, worker recycling) and the [cluster] configuration, with fake nodes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hsmproxy.backend.client import NodeDown
from hsmproxy.cluster.health import HealthChecker
from hsmproxy.cluster.router import Router
from hsmproxy.cluster.state import ClusterSettings, OpState
from hsmproxy.config import ConfigError, parse_settings


class FakeNode:
    """Answers health checks with a scripted result."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        self.answer: str | type[Exception] = "00"
        self.recycled: list[str] = []

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """Answer now, fail, or never answer (TimeoutError case)."""
        assert op == "lmk_check" and args["lmk_id"] == "00"
        fut: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        if self.answer is NodeDown:
            fut.set_exception(NodeDown(self.name))
        elif isinstance(self.answer, str):
            fut.set_result((self.answer, {}))
        return fut

    def recycle(self, reason: str) -> None:
        """Record a worker restart."""
        self.recycled.append(reason)
        self.up = False


def _run(checker: HealthChecker, node: FakeNode, times: int) -> None:
    async def go() -> None:
        for _ in range(times):
            checker.observe(node, *await checker.check_once(node))

    asyncio.run(go())


def test_fall_rise_and_recycle_on_device_failure() -> None:
    node = FakeNode("a")
    router = Router([node], settings=ClusterSettings(fall=3, rise=2, timeout=0.01))
    checker = HealthChecker(router)
    node.answer = "42"  # the worker answers, but its token is unusable
    _run(checker, node, 2)
    assert router.state(node).oper is OpState.UP and not node.recycled
    _run(checker, node, 1)
    assert router.state(node).oper is OpState.DOWN
    assert node.recycled == ["check answered 42"]
    assert router.state(node).check_failures_total == 3  # lifetime count: not reset by the recycle
    assert "3 health checks failed" in router.state(node).history[-1].reason
    node.up, node.answer = True, "00"  # the restarted worker opened the token again
    _run(checker, node, 1)
    assert router.state(node).oper is OpState.DOWN
    _run(checker, node, 1)
    assert router.state(node).oper is OpState.UP
    assert router.state(node).history[-1].reason == "2 health checks passed"


def test_timeouts_take_a_node_down_without_recycling() -> None:
    node = FakeNode("a")
    router = Router([node], settings=ClusterSettings(fall=2, rise=1, timeout=0.01))
    checker = HealthChecker(router)
    node.answer = TimeoutError  # never answers: a stopped process
    _run(checker, node, 2)
    assert router.state(node).oper is OpState.DOWN and node.recycled == []
    assert "timed out" in router.state(node).history[-1].reason


def test_a_dead_worker_is_down_at_once() -> None:
    node = FakeNode("a")
    router = Router([node], settings=ClusterSettings(fall=5))
    checker = HealthChecker(router)
    node.up = False
    _run(checker, node, 1)
    assert router.state(node).oper is OpState.DOWN
    assert router.state(node).history[-1].reason.startswith("worker not running")


_NODE = {"name": "n1", "pin_file": "pin"}


def test_cluster_config() -> None:
    s = parse_settings({"nodes": [_NODE]}, Path("/tmp"))
    assert s.cluster == ClusterSettings() and s.console_bind is None and s.http_bind is None
    s = parse_settings(
        {
            "cluster": {"inter": 1, "fall": 2, "rise": 4, "slowstart": 5, "affinity_spill": 8},
            "console": {"bind": "127.0.0.1:9998"},
            "http": {"bind": "127.0.0.1:9100"},
            "nodes": [{**_NODE, "weight": 3}, {**_NODE, "name": "n2", "backup": True}],
        },
        Path("/tmp"),
    )
    assert (s.cluster.inter, s.cluster.fall, s.cluster.rise, s.cluster.slowstart) == (1.0, 2, 4, 5.0)
    assert s.node_weights == {"n1": 3, "n2": 1} and s.backup_nodes == {"n2"}
    assert s.console_bind == ("127.0.0.1", 9998) and s.http_bind == ("127.0.0.1", 9100)
    for bad in (
        {"interval": 1},
        {"fall": 0},
        {"inter": "x"},
        {"base_ejection_time": 10, "max_ejection_time": 5},
    ):
        with pytest.raises(ConfigError):
            parse_settings({"cluster": bad, "nodes": [_NODE]}, Path("/tmp"))
    with pytest.raises(ConfigError):
        parse_settings({"nodes": [{**_NODE, "weight": -1}]}, Path("/tmp"))


def test_router_failures_are_counted_per_node() -> None:
    a, b = FakeNode("a"), FakeNode("b")
    router = Router([a, b], settings=ClusterSettings())
    router.report_failure(a, "transport or device error")
    router.report_failure(a, "no answer within 2s")  # already ejected: still counted
    assert router.state(a).errors_total == 2 and router.state(b).errors_total == 0
