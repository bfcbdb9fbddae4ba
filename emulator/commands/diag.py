"""Diagnostics and utility commands: NC, NO, B2, GM."""

from __future__ import annotations

import hashlib

from emulator.commands.common import text
from emulator.crypto.errors import CryptoError
from emulator.crypto.lmk import kcv_tdes
from emulator.hsm import Reply
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values

_HASHES = {"01": "sha1", "05": "sha224", "06": "sha256", "07": "sha384", "08": "sha512"}


def nc(state: EmulatorState, v: Values) -> Reply:
    """NC: LMK check value (16 hex) of the selected variant LMK and the firmware number."""
    lmk_id = text(v, "lmk_id", state.default_lmk_id)
    lmk = state.variant_lmks.get(lmk_id)
    if lmk is None:
        if lmk_id in state.keyblock_lmks:
            kb = state.keyblock_lmks[lmk_id]
            return Reply(
                values={
                    "lmk_check": kb.check_value().hex().upper().ljust(16, "0")[:16],
                    "firmware": state.firmware,
                }
            )
        raise CryptoError("13", "unknown LMK identifier")
    return Reply(values={"lmk_check": kcv_tdes(lmk.pair("00")).hex().upper(), "firmware": state.firmware})


def no(state: EmulatorState, v: Values) -> Reply:
    """NO: status. Mode 00 reports buffer size, interface, sockets and firmware."""
    mode = text(v, "mode")
    if mode == "01":
        return Reply(values={"pci_compliance": "0", "reserved_3": "0" * 10})
    if mode != "00":
        raise CryptoError("15", "invalid status mode")
    return Reply(
        values={
            "io_buffer_size": "2",
            "ethernet_type": "1",
            "tcp_sockets": "64",
            "firmware": state.firmware,
            "reserved_1": "0",
            "reserved_2": "0000",
        }
    )


def b2(state: EmulatorState, v: Values) -> Reply:
    """B2: echo the data back."""
    return Reply(values={"data": v["data"]})


def gm(state: EmulatorState, v: Values) -> Reply:
    """GM: hash the data with SHA-1/224/256/384/512; the digest is returned as binary."""
    name = _HASHES.get(text(v, "hash_id"))
    if name is None:
        raise CryptoError("15", "unsupported hash identifier")
    data = v["data"]
    assert isinstance(data, bytes)
    return Reply(values={"hash": hashlib.new(name, data).digest()})


HANDLERS = {"NC": nc, "NO": no, "B2": b2, "GM": gm}
