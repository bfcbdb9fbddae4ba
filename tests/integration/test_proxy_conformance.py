"""The differential run in CI: the bundled cases and random requests, proxy against emulator."""

from __future__ import annotations

import io
import json

from conformance.runner import run_conformance
from protocols.hostcmd.table import COMMANDS
from tests.integration.conftest import RunningEmulator
from tests.integration.proxy_env import RunningProxy


def test_proxy_agrees_with_the_emulator(running_proxy: RunningProxy, emulator: RunningEmulator) -> None:
    out = io.StringIO()
    code = run_conformance(
        reference=(emulator.host, emulator.port),
        target=("127.0.0.1", running_proxy.port),
        random_count=40,
        seed=20261126,
        as_json=True,
        out=out,
    )
    text = out.getvalue()
    summary = json.loads(text[text.index("{") :])
    per_command = summary["commands"]
    assert set(COMMANDS) <= set(per_command), "every command of the table was exercised"
    for name in COMMANDS:
        row = per_command[name]
        assert row["different"] == 0 and row["errors"] == 0, (name, row)
        assert row["unsupported"] == 0, f"{name} is not served by the proxy"
    assert code == 0
