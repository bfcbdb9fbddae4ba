"""Start the emulator: build its state (test LMKs plus any LMK files) and serve."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from emulator.crypto.keyblock import KeyBlockLmk
from emulator.crypto.lmk import TEST_LMK, VariantLmk, load_lmk_file
from emulator.hsm import EmulatorHsm
from emulator.server import serve
from emulator.state import EmulatorState

#: The AES key-block LMK (version 1) of the public BP-Tools captures (VECTORS.md section 5): LMK id 01.
TEST_KEYBLOCK_LMK = KeyBlockLmk(
    "1", bytes.fromhex("9B71333A13F9FAE72F9D0E2DAB4AD6784718012F9244033F3F26A2DE0C8AA11A")
)


def build_state(header_length: int = 4, lmk_files: Sequence[str] = ()) -> EmulatorState:
    """The emulator's state: test variant LMK as id 00, test AES key-block LMK as id 01, plus files."""
    state = EmulatorState(
        variant_lmks={"00": TEST_LMK},
        keyblock_lmks={"01": TEST_KEYBLOCK_LMK},
        header_length=header_length,
    )
    for path in lmk_files:
        for lmk_id, lmk in load_lmk_file(path).items():
            if lmk_id in state.variant_lmks or lmk_id in state.keyblock_lmks:
                raise ValueError(f"LMK id {lmk_id} is loaded twice")
            if isinstance(lmk, VariantLmk):
                state.variant_lmks[lmk_id] = lmk
            else:
                state.keyblock_lmks[lmk_id] = lmk
    return state


def run_emulator(host: str, port: int, header_length: int = 4, lmk_files: Sequence[str] = ()) -> int:
    """Run the emulator until SIGTERM/SIGINT; return the process exit code."""
    hsm = EmulatorHsm(build_state(header_length, lmk_files))
    try:
        import uvloop

        uvloop.run(serve(hsm, host, port))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(hsm, host, port))
    return 0
