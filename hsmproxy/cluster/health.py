"""Active health checks (HAProxy's ``inter``/``fall``/``rise``/``timeout``).

Every ``inter`` seconds each node runs the ``lmk_check`` operation (the check value of an LMK
object: one DES encryption inside the token, so it proves the module, the session and the LMK
objects are usable). ``fall`` consecutive failures take an UP node DOWN; ``rise`` consecutive
successes bring a DOWN node UP (with slow start). A failure is: no answer within ``timeout``, the
worker not running, a device error, or any answer other than ``00``.

A worker that answers but cannot use its token (e.g. the token directory vanished: its LMK
handles are invalid and stay invalid even when the token returns) is recycled when the node goes
DOWN, and again after every further ``fall`` failed checks: the worker restarts with back-off,
keeps failing to open the token while it is missing, and opens it again once it is back; ``rise``
passing checks then bring the node UP. A check that merely times out does not recycle the worker
(a stopped or slow process resumes by itself, and killing it would lose its warm key cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any

from hsmproxy.backend.client import NodeDown
from hsmproxy.cluster.router import Backend, Router
from hsmproxy.cluster.state import OpState

log = logging.getLogger("hsmproxy.cluster")

#: The cheap operation a health check runs.
CHECK_OP = "lmk_check"


class HealthChecker:
    """One background task per node, running checks and moving nodes UP/DOWN."""

    def __init__(self, router: Router, lmk_id: str = "00") -> None:
        self.router = router
        self.settings = router.settings
        self.check_args: dict[str, Any] = {"lmk_id": lmk_id, "firmware": "0000-0000"}
        self.checks = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start checking every node (spread over the first interval)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(n), name=f"health-{n.name}") for n in self.router.nodes]

    async def stop(self) -> None:
        """Stop checking."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

    async def _run(self, node: Backend) -> None:
        inter = self.settings.inter
        await asyncio.sleep(random.uniform(0, inter))  # spread the checks of different nodes
        while True:
            ok, reason, device = await self.check_once(node)
            self.observe(node, ok, reason, device)
            await asyncio.sleep(inter)

    async def check_once(self, node: Backend) -> tuple[bool, str, bool]:
        """Run one check: (passed, reason if not, the worker answered but its device is unusable)."""
        self.checks += 1
        if not node.up:
            last = getattr(node, "last_error", "")
            return False, f"worker not running{f' ({last})' if last else ''}", False
        started = self.router.clock()
        try:
            pending = node.submit(CHECK_OP, dict(self.check_args))
            code, _ = await asyncio.wait_for(pending, self.settings.timeout)
        except NodeDown:
            return False, "worker failed during the check", False
        except TimeoutError:
            # queued behind traffic: a node that answered a request within the timeout is alive
            if self.router.state(node).last_answer >= started:  # it answered requests meanwhile
                return True, "", False
            return False, f"check timed out after {self.settings.timeout:g}s", False
        if code != "00":
            return False, f"check answered {code}", True
        return True, "", False

    def observe(self, node: Backend, ok: bool, reason: str, device: bool = False) -> None:
        """Count one check result and move the node UP or DOWN when ``rise``/``fall`` is reached."""
        st = self.router.state(node)
        s = self.settings
        if ok:
            st.check_failures = 0
            st.check_successes += 1
            if st.oper is OpState.DOWN and st.check_successes >= s.rise:
                self.router.set_oper(node, OpState.UP, f"{s.rise} health checks passed")
            return
        st.check_successes = 0
        st.check_failures += 1
        st.check_failures_total += 1
        if not node.up:
            self.router.set_oper(node, OpState.DOWN, reason)  # the worker is gone: no need to wait for fall
            return
        if st.check_failures < s.fall:
            return
        if st.oper is OpState.UP:
            self.router.set_oper(node, OpState.DOWN, f"{reason} ({s.fall} health checks failed)")
        if device:
            st.check_failures = 0
            recycle = getattr(node, "recycle", None)
            if recycle is not None:
                log.warning("node %s: restarting its worker (%s)", node.name, reason)
                recycle(reason)


def check_lmk_id(tenants: Sequence[Any]) -> str:
    """The LMK id health checks use: the default LMK of the first tenant ("00" if none)."""
    for t in tenants:
        lmk = getattr(t, "default_lmk", None)
        if isinstance(lmk, str) and lmk:
            return lmk
    return "00"
