"""Config reload (console RELOAD, SIGHUP), graceful drain on SIGTERM, blue-green takeover (SO_REUSEPORT).

In-process proxies (start_proxy) for RELOAD; ``hsmproxy serve`` subprocesses for the signals, each
stopped by its test. Counts only: no timing assertions.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hsmproxy.config import load_settings
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import make_nodes, start_proxy
from tests.integration.test_console_admin import (
    Console,
    Env,
    call,
    cc_request,
    check_cc,
    rows,
    wait_for,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fix_ports(text: str, ports: list[int]) -> str:
    """Replace each ``bind = "127.0.0.1:0"`` in turn with a fixed port from ``ports``."""
    for port in ports:
        text = text.replace('bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{port}"', 1)
    assert 'bind = "127.0.0.1:0"' not in text
    return text


@pytest.fixture(scope="module")
def nodes_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """SoftHSM2 nodes with the test LMKs (shared by this module): (root, base config)."""
    root = tmp_path_factory.mktemp("reload")
    return root, make_nodes(root)


@pytest.fixture
def env(nodes_config: tuple[Path, Path], tmp_path: Path) -> Iterator[Env]:
    """An in-process proxy on a config file the test may rewrite; stopped after the test."""
    base = nodes_config[1]
    config = write_config(base, tmp_path)
    rp = start_proxy(load_settings(config))
    try:
        assert rp.proxy.console is not None
        rp.proxy.console.failure_delay = 0.0
        yield Env(rp, config, tmp_path / "audit" / "audit.jsonl")
    finally:
        rp.stop()


def rewrite(env: Env, base: Path, tenant_b: str = "", extra: str = "") -> None:
    """Rewrite the env's config file (same ports: every bind stays 127.0.0.1:0)."""
    write_config(base, env.config.parent, tenant_b=tenant_b, extra=extra)


def test_reload_changes_tenant_commands_and_rate(env: Env, nodes_config: tuple[Path, Path]) -> None:
    c = env.console("oscar")
    live = HsmClient("127.0.0.1", env.port_b)  # opened before the reload: sees the new policy too
    try:
        check_cc(live.call(cc_request()))
        admin = env.console("alice")
        assert admin.cmd("CONFIGCMDS bank-b DISABLE NC") == ["OK bank-b disabled: NC"]
        admin.close()
        assert live.call(b"NC")[:4] == b"ND68"
        rewrite(
            env, nodes_config[1], tenant_b='commands = ["NC"]\nrate = 0.001\nburst = 3\nrate_max_delay = 0.0'
        )
        reply = c.cmd("RELOAD")
        assert len(reply) == 1 and reply[0].startswith(f"reloaded {env.config}: tenants changed: bank-b")
        assert "overrides reset to the file" in reply[0] and "restart" not in reply[0]
        assert live.call(cc_request())[:4] == b"CD17"  # CC is no longer one of bank-b's commands
        answers = [live.call(b"NC")[:4] for _ in range(3)]
        assert answers == [b"ND00", b"ND00", b"ND41"]  # burst 3 (the CC took one), then over the rate
        assert call(env.port_b, b"NC")[:4] == b"ND41"  # a new connection: the same tenant bucket
        check_cc(call(env.port_a, cc_request()))  # the other tenant is unaffected
        tenants = {r["name"]: r for r in c.json("SHOW TENANTS")}
        assert tenants["bank-b"]["commands"] == ["NC"] and tenants["bank-b"]["rate"] == 0.001
        assert tenants["bank-b"]["disabled_cmds"] == [] and tenants["bank-b"]["rate_rejected"] == 2
    finally:
        live.close()
        c.close()


def test_reload_with_a_broken_file_keeps_serving(env: Env, nodes_config: tuple[Path, Path]) -> None:
    c = env.console("alice")
    try:
        good = env.config.read_text()
        env.config.write_text(good + "\n[[tenants\n")
        reply = c.cmd("RELOAD")
        assert len(reply) == 1
        assert reply[0].startswith(f"ERR reload failed, the old config stays in force: {env.config}: ")
        assert "line" in reply[0]  # tomllib says where
        check_cc(call(env.port_b, cc_request()))
        rewrite(env, nodes_config[1], tenant_b='default_lmk = "02"')
        assert c.cmd("RELOAD") == [
            "ERR reload failed, the old config stays in force: tenants[0]: default_lmk must be one of lmk_ids"
        ]
        env.config.write_text(good.replace("header_length = 4", 'header_length = "four"', 1))
        reply = c.cmd("RELOAD")
        assert reply[0].startswith(
            f"ERR reload failed, the old config stays in force: {env.config}: ValueError"
        )
        env.config.write_text(good.replace('role = "auditor"', 'role = "root"'))
        reply = c.cmd("RELOAD")
        assert reply[0].startswith("ERR reload failed") and "console.users[2]" in reply[0]
        assert "role must be one of auditor, operator, admin" in reply[0]
        assert c.json("WHOAMI") == {"user": "alice", "role": "admin", "client": c.json("WHOAMI")["client"]}
        check_cc(call(env.port_b, cc_request()))
        assert rows(c.cmd("SHOW TENANTS"))[1]["COMMANDS"] == "all"
        env.config.write_text(good)
        assert c.cmd("RELOAD") == [f"reloaded {env.config}: no run-time changes"]
    finally:
        c.close()


def test_reload_reports_what_needs_a_restart(env: Env, nodes_config: tuple[Path, Path]) -> None:
    c = env.console("alice")
    try:
        text = env.config.read_text().replace("request_timeout = 2.0", "request_timeout = 3.5")
        text = text.replace('role = "auditor"', 'role = "operator"')
        env.config.write_text(text + '\n[http]\nbind = "127.0.0.1:0"\n')
        reply = c.cmd("RELOAD")[0]
        assert "request_timeout 2.0 -> 3.5" in reply and "console users: 3" in reply
        assert reply.endswith("; changed, takes effect on restart: http_bind")
        router = env.rp.proxy.router
        assert router is not None and router.deadline == 3.5
        assert env.rp.proxy.http_port == 0  # not started by a reload
        audrey = Console(env.rp.proxy.console_port)
        try:
            assert audrey.cmd("LOGIN audrey audrey-Secret-3") == ["OK logged in as audrey (operator)"]
        finally:
            audrey.close()
    finally:
        c.close()


# -- subprocesses ------------------------------------------------------------------------------------


@dataclass
class ServeProcess:
    """``hsmproxy serve --config`` as a subprocess logging to a file."""

    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (readiness is checked by the caller)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hsmproxy.cli", "serve", "--config", str(self.config)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def running(self) -> bool:
        """True while the process runs (fails the test with its log when it died)."""
        assert self.proc is not None
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return True

    def logged(self, pattern: str) -> bool:
        """True once the log matches ``pattern``."""
        return self.log.exists() and re.search(pattern, self.log.read_text()) is not None

    def signal(self, sig: int) -> None:
        """Send ``sig``."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self) -> int:
        """Wait for the exit (bounded); the exit status."""
        assert self.proc is not None
        return self.proc.wait(60)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it hangs; reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def processes() -> Iterator[list[ServeProcess]]:
    """Subprocess proxies a test starts; all stopped afterwards."""
    procs: list[ServeProcess] = []
    yield procs
    for p in procs:
        p.stop()


def answers_nc(port: int) -> bool:
    """True if NC on ``port`` answers ND00."""
    try:
        return call(port, b"NC")[:4] == b"ND00"
    except OSError:
        return False


def test_sighup_reloads_and_shutdown_wait_exits_0(
    nodes_config: tuple[Path, Path], tmp_path: Path, processes: list[ServeProcess]
) -> None:
    base = nodes_config[1]
    ports = [_free_port() for _ in range(3)]  # host, host-b, console
    config = write_config(base, tmp_path, users=False)
    config.write_text(fix_ports(config.read_text(), ports))
    proxy = ServeProcess(config, tmp_path / "serve.log")
    processes.append(proxy)
    proxy.start()
    wait_for(lambda: proxy.running() and answers_nc(ports[1]), 60)
    check_cc(call(ports[1], cc_request()))
    good = config.read_text()
    write_config(base, tmp_path, tenant_b='commands = ["NC"]', users=False)
    config.write_text(fix_ports(config.read_text(), ports))
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: proxy.running() and call(ports[1], cc_request())[:4] == b"CD17")
    assert proxy.logged(r"config reloaded .*tenants changed: bank-b")
    check_cc(call(ports[0], cc_request()))
    # a broken file: logged, the running config stays
    config.write_text(good + "\nnot toml at all [\n")
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: proxy.running() and proxy.logged("SIGHUP: reload failed, the old config stays in force"))
    assert call(ports[1], cc_request())[:4] == b"CD17" and answers_nc(ports[1])
    # SHUTDOWN WAIT from the console: a clean exit
    console = Console(ports[2])
    try:
        assert console.cmd("SHUTDOWN WAIT") == ["OK shutting down after in-flight requests finish"]
    finally:
        console.close()
    assert proxy.wait() == 0
    assert proxy.logged("stopped")


@dataclass
class Pipeliner:
    """One connection, a sender thread pipelining CC requests (window 32) and a receiver thread."""

    port: int
    window: int = 32
    sent: int = 0
    answers: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    send_error: str = ""
    recv_error: str = ""

    def start(self) -> None:
        """Connect and start both threads."""
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        # No Nagle: a request is on its way when sendall returns (as switches configure it).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.slots = threading.Semaphore(self.window)
        self.request = cc_request()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._recv, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        try:
            while not self.done.is_set():
                if not self.slots.acquire(timeout=0.5):
                    continue
                with self.lock:
                    frame = f"{self.sent % 10000:04d}".encode() + self.request
                    self.sock.sendall(struct.pack(">H", len(frame)) + frame)
                    self.sent += 1
        except OSError as exc:
            self.send_error = type(exc).__name__

    def _recv(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack(">H", buf[:2])[0]:
                    n = struct.unpack(">H", buf[:2])[0]
                    self.answers.append(buf[2 : 2 + n])
                    buf = buf[2 + n :]
                    self.slots.release()
        except OSError as exc:
            self.recv_error = type(exc).__name__
        finally:
            self.done.set()
            with contextlib.suppress(OSError):  # EOF: close our end, as a switch would before reconnecting
                self.sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Stop the threads and close the socket."""
        self.done.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for t in self.threads:
            t.join(30)


def test_sigterm_drains_with_traffic_flowing(
    nodes_config: tuple[Path, Path], tmp_path: Path, processes: list[ServeProcess]
) -> None:
    port = _free_port()
    config = tmp_path / "drain.toml"
    config.write_text(
        fix_ports(nodes_config[1].read_text().replace("[proxy]\n", "[proxy]\ndrain_timeout = 30\n"), [port])
    )
    proxy = ServeProcess(config, tmp_path / "serve.log")
    processes.append(proxy)
    proxy.start()
    wait_for(lambda: proxy.running() and answers_nc(port), 60)
    client = Pipeliner(port)
    client.start()
    try:
        wait_for(lambda: len(client.answers) >= 300, 120)
        with client.lock:  # no request is sent between reading the count and the signal
            sent_before = client.sent
            proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
        assert client.done.wait(60), "the proxy did not close the connection"
    finally:
        client.stop()
    answers = list(client.answers)
    print(
        f"\nsent before SIGTERM {sent_before}, sent in all {client.sent}, answered {len(answers)}, "
        f"end of answers: {client.recv_error or 'EOF'}"
    )
    assert len(answers) >= sent_before, "a request sent before the drain started got no answer"
    for i, answer in enumerate(answers):  # in order, each the right PIN
        assert answer[:4] == f"{i % 10000:04d}".encode()
        check_cc(answer[4:])
    assert proxy.logged("stopping: draining in-flight requests") and proxy.logged("stopped")


def test_blue_green_switch_with_so_reuseport(
    nodes_config: tuple[Path, Path], tmp_path: Path, processes: list[ServeProcess]
) -> None:
    port = _free_port()
    config = tmp_path / "bg.toml"
    config.write_text(
        fix_ports(nodes_config[1].read_text().replace("[proxy]\n", "[proxy]\ndrain_timeout = 10\n"), [port])
    )
    blue, green = ServeProcess(config, tmp_path / "blue.log"), ServeProcess(config, tmp_path / "green.log")
    processes += [blue, green]
    blue.start()
    wait_for(lambda: blue.running() and answers_nc(port), 60)
    counts = {"ok": 0, "refused": 0, "other": 0}
    ok_after_switch = threading.Event()
    switched = threading.Event()
    stop = threading.Event()
    after = [0]

    def connect_repeatedly() -> None:
        while not stop.is_set():
            try:
                answer = call(port, b"NC")
            except ConnectionRefusedError:
                counts["refused"] += 1
                continue
            except (OSError, AssertionError):
                counts["other"] += 1
                continue
            if answer[:4] == b"ND00":
                counts["ok"] += 1
                if switched.is_set():
                    after[0] += 1
                    if after[0] >= 50:
                        ok_after_switch.set()
            else:
                counts["other"] += 1

    thread = threading.Thread(target=connect_repeatedly, daemon=True)
    thread.start()
    try:
        green.start()
        wait_for(lambda: green.running() and green.logged(f"listener host on 127.0.0.1:{port}"), 60)
        blue.signal(signal.SIGTERM)
        assert blue.wait() == 0
        switched.set()
        assert ok_after_switch.wait(60), counts
    finally:
        stop.set()
        thread.join(30)
    print(f"\nblue-green switch: {counts}")
    assert counts["refused"] == 0, counts
    assert counts["ok"] >= 50
    assert green.running() and answers_nc(port)
