"""The one Prometheus catalogue of hsmproxy, served as ``GET /metrics`` on ``[http] bind``.

Every family lives here, in a :class:`~prometheus_client.CollectorRegistry` owned by one
:class:`Metrics` (one per :class:`~hsmproxy.server.app.Proxy`; the global registry is never used).

Updated per answered host command (a :data:`~hsmproxy.server.hostcmd.CommandObserver`):

* ``hsmproxy_commands_total{tenant,command,outcome}`` -- outcome ``ok`` (``00``), ``business``
  (``01``/``02``: verification failed, a normal answer of a working HSM) or ``error_<d>x`` (the
  error code's class by its first digit: ``error_1x`` key/parity/data, ``error_2x`` PIN/format,
  ``error_4x`` no node/internal, ``error_6x`` disabled/unsupported ...);
* ``hsmproxy_command_latency_seconds{command}`` -- histogram, buckets 0.1 ms .. 1 s (+Inf).

Read at scrape time from live state (a custom collector: no I/O, never waits on a worker):

* ``hsmproxy_connections{listener,tenant}``, ``hsmproxy_inflight_commands{listener,tenant}``;
* ``hsmproxy_up`` (1 while at least one node takes requests), ``hsmproxy_draining``;
* overload: ``hsmproxy_requests_shed_total`` (answered ``41`` at once: every node at its limit and the
  admission queue full), ``hsmproxy_requests_expired_total`` (answered ``41`` after waiting
  ``queue_timeout`` for a node), ``hsmproxy_admission_queued`` (waiting now),
  ``hsmproxy_admission_waited_total``, ``hsmproxy_retries_total``, ``hsmproxy_retries_refused_total``
  (the retry budget), ``hsmproxy_slow_timeouts_total`` (timeouts on nodes answering other requests);
  per node ``hsmproxy_node_concurrency_limit{node}`` (the adaptive limit in force),
  ``hsmproxy_node_rtt_seconds{node}`` and ``hsmproxy_node_rtt_noload_seconds{node}``;
* ``hsmproxy_node_state{node,state}`` (operational: UP / DOWN / EJECTED) and
  ``hsmproxy_node_admin_state{node,state}`` (READY / DRAIN / MAINT): HAProxy style, one series
  per possible state, 1 for the current one and 0 for the others;
* ``hsmproxy_node_outstanding{node}``, ``hsmproxy_node_requests_total{node}``,
  ``hsmproxy_node_errors_total{node}`` (transport errors, timeouts, device errors seen by the
  router), ``hsmproxy_node_check_failures_total{node}``, ``hsmproxy_node_ejections_total{node}``,
  ``hsmproxy_node_worker_restarts_total{node}``, ``hsmproxy_node_info{node,manufacturer,model,firmware}``;
* from the node workers (refreshed by a background task every ``refresh_interval`` seconds, the
  last answer is served): ``hsmproxy_node_key_cache_hits_total{node}``,
  ``hsmproxy_node_key_cache_misses_total{node}`` (hit ratio = hits / (hits + misses)),
  ``hsmproxy_node_fallback_unwraps_total{node}``, ``hsmproxy_node_native_unwraps_total{node}``,
  ``hsmproxy_node_module_reinits_total{node}`` (SoftHSM2 re-initialised to free memory) --
  these restart from 0 with the worker, which Prometheus' ``rate()`` treats as a counter reset;
* with a ``[keystore]`` (refreshed by the same task): ``hsmproxy_keys{state}``,
  ``hsmproxy_keys_pending_rotation``, ``hsmproxy_keys_expiring{within="7d"|"30d"}``;
* with ISO 8583 listeners: ``hsmproxy_iso8583_messages_total{listener,tenant,result}`` (result =
  field 39 of the answer, ``00`` translated), ``hsmproxy_iso8583_latency_seconds{listener}``
  (histogram), ``hsmproxy_iso8583_connections{listener}``,
  ``hsmproxy_iso8583_upstream_up{listener}`` (inline mode);
* with an ``[audit]`` trail: ``hsmproxy_audit_records_written_total`` (lines: records and
  checkpoints), ``hsmproxy_audit_records_dropped_total`` (a gap in the trail),
  ``hsmproxy_audit_checkpoints_total``, ``hsmproxy_audit_refusals_total`` (requests answered without a
  node, counted into aggregate records), ``hsmproxy_audit_pending``, ``hsmproxy_audit_unsealed``
  (records not yet under a signed checkpoint), ``hsmproxy_audit_failing`` (1 while the file cannot be
  written) and, with ``[audit.syslog]``,
  ``hsmproxy_audit_syslog_sent_total``, ``hsmproxy_audit_syslog_dropped_total``,
  ``hsmproxy_audit_syslog_connects_total``.

Labels carry only configuration names (tenant, listener, node), two-letter command codes known to
the proxy (any other code is counted as ``other``), outcome classes and device descriptions: never a
key, PIN, PIN block, PAN or any other field value.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from hsmproxy.cluster.state import AdminState
from hsmproxy.periodic import Refresher
from hsmproxy.server.hostcmd import CommandRecord

if TYPE_CHECKING:
    from hsmproxy.server.app import Proxy

log = logging.getLogger("hsmproxy.metrics")

#: Content type of the text exposition format (what ``generate_latest`` writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Latency buckets: 0.1 ms .. 1 s.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
#: Seconds between refreshes of worker counters and key inventory.
REFRESH_INTERVAL = 5.0
#: Operational states of ``hsmproxy_node_state``.
OPER_STATES = ("UP", "DOWN", "EJECTED")
#: Worker counters: (stats key, family name suffix, help).
WORKER_STATS = (
    ("cache_hits", "key_cache_hits", "Working-key handle cache hits in the node worker."),
    ("cache_misses", "key_cache_misses", "Working-key handle cache misses in the node worker."),
    ("fallback_imports", "fallback_unwraps", "Keys brought into the token by the fallback (clear) path."),
    ("native_unwraps", "native_unwraps", "Keys unwrapped natively by the token."),
    ("module_reinits", "module_reinits", "PKCS#11 module re-initialisations (frees SoftHSM2 memory)."),
)


#: An ISO 8583 response code as a label value (two letters or digits).
_RESPONSE_CODE = re.compile(r"[0-9A-Z]{2}")

#: Most memoised (tenant, command, error) label children.
MAX_CHILDREN = 4096


def outcome(error: str) -> str:
    """The ``outcome`` label of a response error code."""
    if error == "00":
        return "ok"
    if error in ("01", "02"):
        return "business"
    if len(error) == 2 and error[0].isdigit():
        return f"error_{error[0]}x"
    return "error_other"


class Metrics:
    """The proxy's registry: command observer, scrape-time collector and refresh task."""

    def __init__(
        self,
        proxy: Proxy,
        commands: Iterable[str] = (),
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.proxy = proxy
        self.registry = CollectorRegistry(auto_describe=False)
        self.refresh_interval = refresh_interval
        self.draining = False
        self._known = frozenset(commands)
        #: (tenant, command, error) -> the label children it counts into (labels() is slow).
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.commands = Counter(
            "hsmproxy_commands",
            "Host commands answered, by tenant, command code and outcome.",
            ("tenant", "command", "outcome"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "hsmproxy_command_latency_seconds",
            "Seconds from a request's arrival to its response being written.",
            ("command",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.iso_latency = Histogram(
            "hsmproxy_iso8583_latency_seconds",
            "Seconds from an ISO 8583 message's arrival to its answer.",
            ("listener",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._iso_children: dict[str, Any] = {}
        #: Last worker counters per node, and key inventory (None: no keystore or not read yet).
        self.worker_stats: dict[str, dict[str, int]] = {}
        self.inventory: dict[str, Any] | None = None
        # a failing refresh is logged and the last values stay served: metrics never take the proxy down
        self._refresher = Refresher(self.refresh, refresh_interval, "metrics-refresh", "refresh failed")
        self.registry.register(_LiveCollector(self))

    # -- per command ------------------------------------------------------------------------------

    def observe(self, record: CommandRecord) -> None:
        """Count one answered host command (the Proxy's command observer)."""
        key = (record.tenant, record.command, record.error)
        children = self._children.get(key)
        if children is None:
            command = record.command if record.command in self._known else "other"
            children = (
                self.commands.labels(record.tenant, command, outcome(record.error)),
                self.latency.labels(command),
            )
            if len(self._children) < MAX_CHILDREN:  # bounded: tenants x commands x codes in use
                self._children[key] = children
        children[0].inc()
        children[1].observe(record.latency)

    def observe_iso(self, listener: str, seconds: float) -> None:
        """One answered ISO 8583 message on ``listener`` (a configured name)."""
        child = self._iso_children.get(listener)
        if child is None:
            child = self._iso_children[listener] = self.iso_latency.labels(listener)
        child.observe(seconds)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read once; then refresh worker counters and the key inventory periodically."""
        await self.refresh()
        self._refresher.start()

    async def stop(self) -> None:
        """Stop the refresh task."""
        await self._refresher.stop()

    async def refresh(self, timeout: float = 2.0) -> None:
        """Ask every running worker for its counters and read the key inventory (bounded wait)."""
        nodes = [n for n in self.proxy.nodes if n.up]
        answers = await asyncio.gather(
            *(asyncio.wait_for(n.request_stats(), timeout) for n in nodes), return_exceptions=True
        )
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, dict):
                self.worker_stats[node.name] = answer
        lifecycle = self.proxy.lifecycle
        if lifecycle is not None:
            try:
                self.inventory = lifecycle.store.inventory(datetime.now(UTC))
            except Exception:
                log.warning("metrics: key inventory unavailable", exc_info=True)

    # -- exposition -------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition of every family."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Families read from live proxy state at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.m
        proxy = m.proxy
        yield from self._connections(proxy)
        router = proxy.router
        up = GaugeMetricFamily("hsmproxy_up", "1 while at least one node can take requests.")
        up.add_metric([], 1.0 if router is not None and router.ready() else 0.0)
        yield up
        draining = GaugeMetricFamily("hsmproxy_draining", "1 once a graceful stop has started.")
        draining.add_metric([], 1.0 if m.draining else 0.0)
        yield draining
        for attr, name, text in (
            ("shed_total", "requests_shed", "Requests answered 41 at once: they could not start in time."),
            ("expired", "requests_expired", "Requests answered 41 after waiting queue_timeout for a node."),
            ("queued_total", "admission_waited", "Requests that waited in the admission queue."),
            ("retries", "retries", "Requests retried on another node after a failure or timeout."),
            ("retries_refused", "retries_refused", "Retries the retry budget refused."),
            ("slow_timeouts", "slow_timeouts", "Timeouts on nodes answering other requests (no failure)."),
        ):
            family = CounterMetricFamily(f"hsmproxy_{name}", text)
            family.add_metric([], float(getattr(router, attr, 0)) if router is not None else 0.0)
            yield family
        queued = GaugeMetricFamily("hsmproxy_admission_queued", "Requests waiting for a node to take them.")
        queued.add_metric([], float(router.queued) if router is not None else 0.0)
        yield queued
        if router is None:
            return
        yield from self._limits(router)
        now = router.clock()
        oper = GaugeMetricFamily(
            "hsmproxy_node_state",
            "Operational state of each node (1: current state).",
            labels=["node", "state"],
        )
        admin = GaugeMetricFamily(
            "hsmproxy_node_admin_state",
            "Admin state of each node (1: current state).",
            labels=["node", "state"],
        )
        outstanding = GaugeMetricFamily(
            "hsmproxy_node_outstanding", "Requests sent to the node and not yet answered.", labels=["node"]
        )
        per_node: dict[str, tuple[str, Callable[[str], float]]] = {
            "requests": ("Requests routed to the node.", lambda n: router.state(n).requests),
            "errors": ("Transport errors, timeouts, device errors.", lambda n: router.state(n).errors_total),
            "check_failures": ("Failed health checks.", lambda n: router.state(n).check_failures_total),
            "ejections": ("Passive outlier ejections.", lambda n: router.state(n).ejections),
        }
        counters = {
            key: CounterMetricFamily(f"hsmproxy_node_{key}", text, labels=["node"])
            for key, (text, _) in per_node.items()
        }
        restarts = CounterMetricFamily("hsmproxy_node_worker_restarts", "Worker restarts.", labels=["node"])
        info = InfoMetricFamily(
            "hsmproxy_node", "The node's token.", labels=["node", "manufacturer", "model", "firmware"]
        )
        stats = {
            key: CounterMetricFamily(f"hsmproxy_node_{name}", text, labels=["node"])
            for key, name, text in WORKER_STATS
        }
        for node in router.nodes:
            name = node.name
            st = router.state(name)
            current = st.status(now)
            for state in OPER_STATES:
                oper.add_metric([name, state], 1.0 if state == current else 0.0)
            for a in AdminState:
                admin.add_metric([name, a.value], 1.0 if a is st.admin else 0.0)
            outstanding.add_metric([name], float(st.outstanding))
            for key, (_, value) in per_node.items():
                counters[key].add_metric([name], float(value(name)))
            restarts.add_metric([name], float(getattr(node, "restarts", 0)))
            node_info: dict[str, Any] = getattr(node, "info", {}) or {}
            info.add_metric(
                [name],
                {k: str(node_info.get(k, "")) for k in ("manufacturer", "model", "firmware")},
            )
            worker = m.worker_stats.get(name, {})
            for key, _, _ in WORKER_STATS:
                stats[key].add_metric([name], float(worker.get(key, 0)))
        yield from (oper, admin, outstanding, *counters.values(), restarts, info, *stats.values())
        yield from self._inventory(m.inventory)
        yield from self._audit(getattr(m.proxy, "audit", None))
        yield from self._iso(getattr(m.proxy, "iso", None))

    @staticmethod
    def _limits(router: Any) -> Iterable[Metric]:
        """Each node's adaptive concurrency limit and the RTTs it is moved by."""
        families = (
            ("concurrency_limit", "The node's adaptive concurrency limit in force.", "current"),
            ("rtt_seconds", "Recent round-trip time of the node's answers (front lag too).", "rtt_recent"),
            ("rtt_noload_seconds", "The node's measured no-load round-trip time.", "rtt_noload"),
        )
        for key, text, attr in families:
            family = GaugeMetricFamily(f"hsmproxy_node_{key}", text, labels=["node"])
            for name, limit in router.limits.items():
                family.add_metric([name], float(getattr(limit, attr)))
            yield family

    @staticmethod
    def _iso(iso: Any) -> Iterable[Metric]:
        """ISO 8583 listeners' counters, read at scrape time (nothing without an ISO listener)."""
        if iso is None:
            return
        messages = CounterMetricFamily(
            "hsmproxy_iso8583_messages",
            "ISO 8583 messages answered, by listener, tenant and field 39 of the answer (00: translated).",
            labels=["listener", "tenant", "result"],
        )
        conns = GaugeMetricFamily(
            "hsmproxy_iso8583_connections", "Open ISO 8583 connections.", labels=["listener"]
        )
        upstream = GaugeMetricFamily(
            "hsmproxy_iso8583_upstream_up",
            "1 while an inline listener is connected upstream.",
            labels=["listener"],
        )
        for name, listener in iso.listeners.items():
            tenant, stats = listener.config.tenant, listener.stats
            messages.add_metric([name, tenant, "00"], float(stats.translated))
            other = 0
            for code, count in stats.errors.items():
                if _RESPONSE_CODE.fullmatch(code):
                    messages.add_metric([name, tenant, code], float(count))
                else:  # whatever an upstream put in field 39 must not explode the label set
                    other += count
            if other:
                messages.add_metric([name, tenant, "other"], float(other))
            conns.add_metric([name], float(len(listener.connections)))
            if listener.upstream is not None:
                upstream.add_metric([name], 1.0 if listener.upstream.connected.is_set() else 0.0)
        yield from (messages, conns, upstream)

    @staticmethod
    def _audit(audit: Any) -> Iterable[Metric]:
        """The audit trail's counters (nothing without ``[audit]``)."""
        if audit is None:
            return
        for name, text, value in (
            ("records_written", "Audit lines written to the file (records and checkpoints).", audit.written),
            ("records_dropped", "Audit records lost (queue overflow while failing): gaps.", audit.dropped),
            ("checkpoints", "Signed checkpoints written to the audit file.", audit.checkpoints),
            ("refusals", "Requests answered without a node, counted into aggregate records.", audit.refusals),
        ):
            family = CounterMetricFamily(f"hsmproxy_audit_{name}", text)
            family.add_metric([], float(value))
            yield family
        pending = GaugeMetricFamily("hsmproxy_audit_pending", "Audit records waiting to be written.")
        pending.add_metric([], float(audit.waiting))
        yield pending
        unsealed = GaugeMetricFamily("hsmproxy_audit_unsealed", "Audit records not under a checkpoint yet.")
        unsealed.add_metric([], float(audit.unsealed))
        yield unsealed
        failing = GaugeMetricFamily("hsmproxy_audit_failing", "1 while the audit file cannot be written.")
        failing.add_metric([], 1.0 if audit.failing else 0.0)
        yield failing
        sink = audit.sink
        if sink is not None:
            for name, text, value in (
                ("sent", "Audit records delivered to the syslog server.", sink.sent),
                ("dropped", "Audit records the syslog queue dropped (server away or slow).", sink.dropped),
                ("connects", "Connections made to the syslog server.", sink.connects),
            ):
                family = CounterMetricFamily(f"hsmproxy_audit_syslog_{name}", text)
                family.add_metric([], float(value))
                yield family

    @staticmethod
    def _connections(proxy: Proxy) -> Iterable[Metric]:
        open_: dict[tuple[str, str], int] = {}
        inflight: dict[tuple[str, str], int] = {}
        for tenant in proxy.tenancy.tenants.values() if proxy.tenancy is not None else ():
            for lc in proxy.settings.listeners:
                if lc.tenant == tenant.name:
                    open_.setdefault((lc.name, tenant.name), 0)
                    inflight.setdefault((lc.name, tenant.name), 0)
        for conn in list(proxy.connections):
            if not conn.tenant_name:  # not admitted (yet)
                continue
            key = (conn.listener, conn.tenant_name)
            open_[key] = open_.get(key, 0) + 1
            inflight[key] = inflight.get(key, 0) + conn.inflight
        conns = GaugeMetricFamily(
            "hsmproxy_connections", "Open host connections.", labels=["listener", "tenant"]
        )
        busy = GaugeMetricFamily(
            "hsmproxy_inflight_commands", "Host commands received and not yet answered.",
            labels=["listener", "tenant"],
        )  # fmt: skip
        for key in sorted(open_):
            conns.add_metric(list(key), float(open_[key]))
            busy.add_metric(list(key), float(inflight[key]))
        yield conns
        yield busy

    @staticmethod
    def _inventory(inv: dict[str, Any] | None) -> Iterable[Metric]:
        if inv is None:
            return
        keys = GaugeMetricFamily(
            "hsmproxy_keys", "Managed key versions by life-cycle state.", labels=["state"]
        )
        for state, count in sorted(inv.get("by_state", {}).items()):
            keys.add_metric([str(state)], float(count))
        pending = GaugeMetricFamily("hsmproxy_keys_pending_rotation", "Key versions due for rotation.")
        pending.add_metric([], float(inv.get("pending_rotation", 0)))
        expiring = GaugeMetricFamily(
            "hsmproxy_keys_expiring", "Key versions expiring (or leaving grace) within a window.",
            labels=["within"],
        )  # fmt: skip
        for days in (7, 30):
            expiring.add_metric([f"{days}d"], float(inv.get(f"expiring_{days}d", 0)))
        yield from (keys, pending, expiring)
