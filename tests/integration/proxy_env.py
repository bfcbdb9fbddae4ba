"""Test environment for the proxy: SoftHSM2 tokens in a temp dir, test LMKs, a running proxy."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsmproxy.config import Settings, load_settings
from hsmproxy.server.app import Proxy
from hsmproxy.server.hostcmd import CommandObserver

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
#: The pinned public keys of the nodes' audit signing keys, next to the config (``[audit] trusted_keys``).
AUDIT_KEYS = "audit-keys.pem"


def make_nodes(root: Path, names: tuple[str, ...] = ("node-a", "node-b"), strict: bool = False) -> Path:
    """Create SoftHSM2 tokens + PIN files under ``root`` and a config; load the test LMKs; generate each
    node's audit signing key and pin the public keys in ``root / AUDIT_KEYS``."""
    if shutil.which("softhsm2-util") is None or not Path(SOFTHSM_MODULE).exists():
        pytest.skip("SoftHSM2 is not installed (make test installs it)")
    lines = [
        "[proxy]",
        "request_timeout = 2.0",
        "[security]",
        f"strict_key_custody = {'true' if strict else 'false'}",
        "[[listeners]]",
        'name = "host"',
        'bind = "127.0.0.1:0"',
        "header_length = 4",
    ]
    for name in names:
        node = root / name
        (node / "tokens").mkdir(parents=True, exist_ok=True)
        conf = node / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {node / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        (node / "pin").write_text("1234")
        env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", name, "--pin", "1234", "--so-pin", "1234"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        lines += [
            "[[nodes]]",
            f'name = "{name}"',
            f'module = "{SOFTHSM_MODULE}"',
            f'token_label = "{name}"',
            f'pin_file = "{node / "pin"}"',
            f'env = {{ SOFTHSM2_CONF = "{conf}" }}',
        ]
    config = root / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    subprocess.run(
        [sys.executable, "-m", "hsmproxy.cli", "lmk", "load", "--all", "--test", "--config", str(config)],
        check=True, capture_output=True,
    )  # fmt: skip
    # every node's audit checkpoint signing key, made inside its token; the public keys pinned here
    subprocess.run(
        [sys.executable, "-m", "hsmproxy.cli", "audit", "keys", "--generate", "--config", str(config),
         "--out", str(root / AUDIT_KEYS)],
        check=True, capture_output=True,
    )  # fmt: skip
    return config


def finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close ``loop`` as ``asyncio.run`` does: cancel what is still pending and let it finish first, so no
    task, transport or socket is left for the garbage collector to warn about during a later test."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(asyncio.sleep(0))  # connection_lost callbacks of transports closed above
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


@dataclass
class RunningProxy:
    """A proxy serving on 127.0.0.1:port, in a background thread with its own event loop."""

    port: int
    proxy: Proxy
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    stop_event: asyncio.Event

    def stop(self) -> None:
        """Stop the proxy and its node workers; wait for the thread."""
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


def start_proxy(
    settings: Settings,
    observers: list[CommandObserver] | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> RunningProxy:
    """Start a proxy for ``settings`` (with command ``observers``) and wait until it listens."""
    loop = loop_factory()
    started = threading.Event()
    holder: dict[str, object] = {}

    async def main() -> None:
        proxy = Proxy(settings, observers=list(observers or []))
        stop = asyncio.Event()
        holder["proxy"], holder["stop"] = proxy, stop
        try:
            await proxy.start()
        finally:
            started.set()
        await stop.wait()
        await proxy.stop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        finally:
            finish_loop(loop)

    thread = threading.Thread(target=run, name="proxy", daemon=True)
    thread.start()
    assert started.wait(60), "proxy did not start"
    proxy = holder["proxy"]
    stop = holder["stop"]
    assert isinstance(proxy, Proxy) and isinstance(stop, asyncio.Event)
    return RunningProxy(proxy.ports[0], proxy, loop, thread, stop)


@pytest.fixture(scope="session")
def proxy_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two SoftHSM2 nodes with the test LMKs, and a config naming them."""
    return make_nodes(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="session")
def running_proxy(proxy_config: Path) -> Iterator[RunningProxy]:
    """A session-wide proxy on the two test nodes."""
    rp = start_proxy(load_settings(proxy_config))
    yield rp
    rp.stop()
