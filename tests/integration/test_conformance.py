"""Differential conformance runs between two live emulators (reference and target).

Each test starts its own emulators on loopback ports (the pattern of conftest.py) and stops them.
"""

from __future__ import annotations

import io
import json

import pytest

from conformance.runner import run_conformance
from emulator.commands import HANDLERS
from emulator.hsm import Reply
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values
from protocols.hostcmd.table import COMMANDS
from tests.integration.conftest import RunningEmulator, running_emulator

# Two emulators run in two threads of this process. emulator.crypto.cipher.legacy_tdes() silences
# cryptography's TripleDES deprecation warning with warnings.catch_warnings(), which is process-wide
# and not thread-safe: one thread leaving the block can re-arm the warning inside the other, and
# pytest's "error" filter would turn it into a 41 answer. Ignore that warning in this module.
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


def _run(
    reference: RunningEmulator, target: RunningEmulator, **kwargs: object
) -> tuple[int, dict[str, object]]:
    out = io.StringIO()
    code = run_conformance(reference.address, target.address, 4, as_json=True, out=out, **kwargs)  # type: ignore[arg-type]
    return code, json.loads(out.getvalue())


def test_two_emulators_agree_on_cases_and_random_requests() -> None:
    with running_emulator() as reference, running_emulator() as target:
        code, summary = _run(reference, target, random_count=20, seed=7)
    commands = summary["commands"]
    assert isinstance(commands, dict)
    assert set(COMMANDS) <= set(commands), "every command of the table is in the summary"
    assert code == 0, summary["differences"]
    assert summary["result"] == "pass"
    for code_name in COMMANDS:
        row = commands[code_name]
        assert row["sent"] >= 20  # EI's cap (40) is above 20
        assert row["different"] == 0 and row["errors"] == 0
    # The bundled VECTORS cases ran: CW has its 12 known-answer cases plus error paths.
    assert commands["CW"]["sent"] > 20


def _wrong_cvv(state: EmulatorState, v: Values) -> Reply:
    reply = HANDLERS["CW"](state, v)
    if reply.error == "00":
        cvv = reply.values["cvv"]
        assert isinstance(cvv, str)
        return Reply(values={"cvv": f"{(int(cvv) + 1) % 1000:03d}"})
    return reply


def test_a_wrong_handler_on_the_target_is_reported() -> None:
    with running_emulator() as reference, running_emulator({**HANDLERS, "CW": _wrong_cvv}) as target:
        code, summary = _run(reference, target, random_count=20, seed=3, commands=["CW", "CY", "GM"])
    assert code == 1
    commands = summary["commands"]
    assert isinstance(commands, dict)
    assert commands["CW"]["different"] >= 20  # every valid random CW plus the known-answer cases
    assert commands["CY"]["different"] == 0 and commands["GM"]["different"] == 0
    differences = summary["differences"]
    assert isinstance(differences, list) and differences
    assert {d["command"] for d in differences} == {"CW"}
    text = json.dumps(differences)
    assert "4123456789012345" not in text  # no PAN (nor keys) in the report


def test_unsupported_on_both_sides_is_its_own_column() -> None:
    no_cw = {code: h for code, h in HANDLERS.items() if code != "CW"}
    with running_emulator(no_cw) as reference, running_emulator(no_cw) as target:
        code, summary = _run(reference, target, random_count=5, commands=["CW"], cases_dir=None)
    commands = summary["commands"]
    assert isinstance(commands, dict)
    row = commands["CW"]
    # Random requests and the exact-answer CW cases all answer 68 on both sides: not "same", and
    # not a failure of the target either.
    assert row["same"] == 0 and row["unsupported"] == row["sent"] > 5
    assert code == 0


def test_target_missing_a_command_differs() -> None:
    no_cw = {code: h for code, h in HANDLERS.items() if code != "CW"}
    with running_emulator() as reference, running_emulator(no_cw) as target:
        code, summary = _run(reference, target, random_count=10, commands=["CW"])
    assert code == 1
    commands = summary["commands"]
    assert isinstance(commands, dict)
    assert commands["CW"]["different"] == commands["CW"]["sent"]


def test_text_table_and_unreachable_target() -> None:
    with running_emulator() as reference:
        out = io.StringIO()
        code = run_conformance(
            reference.address, reference.address, 4, None, 3, 1, ["NC", "B2"], False, out=out
        )
        text = out.getvalue()
        assert code == 0
        assert "command" in text and "unsupported" in text and "PASS" in text
        assert (
            run_conformance(reference.address, ("127.0.0.1", 9), 4, None, 1, 1, ["NC"], False, out=out) == 2
        )
