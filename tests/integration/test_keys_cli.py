"""``hsmproxy keys …`` on a SoftHSM2 node: generate, import, export, lifecycle, list/show/json.

Generated and imported cryptograms are checked independently: BU on the reference emulator (same
test LMK) gives the same check value, and decrypting under the test LMK (emulator crypto) gives the
same clear key after an export/import round trip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from emulator.crypto.lmk import TEST_LMK, decrypt_key_under_lmk
from hsmproxy.cli import main
from hsmproxy.keys.store import KeyState, KeyStore
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import make_nodes

#: BU key type codes (``VPP`` -> ``V`` + ``P[1]``) of the types generated below.
BU_CODE = {"000": "00", "001": "01", "002": "02", "402": "42", "003": "03", "009": "09", "109": "19"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SoftHSM2 node with the test LMKs; the keystore at ``keys.db`` next to the config."""
    path = make_nodes(tmp_path_factory.mktemp("keys-cli"), ("node-a",))
    with path.open("a") as fh:
        fh.write('[keystore]\nurl = "sqlite:///keys.db"\n')
    return path


class Keys:
    """Runs ``hsmproxy keys …`` in-process and captures its output."""

    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config, self.capsys = config, capsys

    def run(self, *args: str) -> tuple[int, str, str]:
        """(exit code, stdout, stderr)."""
        self.capsys.readouterr()
        rc = main(["keys", args[0], "--config", str(self.config), "--actor", "tester", *args[1:]])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def json(self, *args: str) -> Any:
        """The parsed ``--json`` output of a command that must succeed."""
        rc, out, err = self.run(*args, "--json")
        assert rc == 0, err
        return json.loads(out)


@pytest.fixture
def keys(config: Path, capsys: pytest.CaptureFixture[str]) -> Keys:
    """The CLI runner."""
    return Keys(config, capsys)


def bu_kcv(client: HsmClient, type_code: str, cryptogram: str) -> str:
    """The 6-hex check value the emulator computes for a cryptogram under the test LMK."""
    flag = {"U": "1", "X": "1", "T": "2", "Y": "2"}.get(cryptogram[0], "0")
    resp = client.call(b"BU" + BU_CODE[type_code].encode() + flag.encode() + cryptogram.encode())
    assert resp[:4] == b"BV00", resp
    return resp[4:10].decode()


@pytest.mark.parametrize("key_type", ["ZMK", "ZPK", "TPK", "CVK", "TAK", "BDK", "MK-AC"])
def test_generate_kcv_matches_emulator(keys: Keys, client: HsmClient, key_type: str) -> None:
    rec = keys.json("generate", "--name", f"gen-{key_type}", "--type", key_type)
    assert rec["state"] == "active" and rec["version"] == 1 and rec["created_by"] == "tester"
    assert rec["cryptogram"].startswith("U") and len(rec["cryptogram"]) == 33
    assert rec["kcv"] == bu_kcv(client, rec["type_code"], rec["cryptogram"])
    clear = decrypt_key_under_lmk(TEST_LMK, rec["type_code"], rec["cryptogram"])
    assert len(clear) == 16 and all(bin(b).count("1") % 2 for b in clear)  # odd parity, from the token


def test_generate_triple_and_policy(keys: Keys, client: HsmClient, config: Path) -> None:
    rec = keys.json("generate", "--name", "zpk-t", "--type", "ZPK", "--scheme", "T", "--rotate-every", "30d",
                    "--grace", "7d")  # fmt: skip
    assert (
        rec["cryptogram"].startswith("T")
        and rec["rotate_every"] == 30 * 86400
        and rec["grace_period"] == 7 * 86400
    )
    assert rec["kcv"] == bu_kcv(client, "001", rec["cryptogram"])
    assert rec["expiry_date"] is not None
    assert (config.parent / "keys.db").exists()  # relative keystore path resolved against the config file
    rc, _, err = keys.run("generate", "--name", "zpk-t", "--type", "ZPK")
    assert rc == 1 and "rotate" in err
    rc, _, err = keys.run("generate", "--name", "rsa", "--type", "RSA")
    assert rc == 1 and "not supported yet" in err


def _tdes_ecb(key: bytes, data: bytes, decrypt: bool) -> bytes:
    c = Cipher(TripleDES(key + key[:8] if len(key) == 16 else key), modes.ECB())
    ctx = c.decryptor() if decrypt else c.encryptor()
    return ctx.update(data) + ctx.finalize()


def test_export_import_round_trip(keys: Keys, client: HsmClient, config: Path) -> None:
    zmk = keys.json("generate", "--name", "rt-zmk", "--type", "ZMK")
    zpk = keys.json("generate", "--name", "rt-zpk", "--type", "ZPK")
    clear_zmk = decrypt_key_under_lmk(TEST_LMK, "000", zmk["cryptogram"])
    clear_zpk = decrypt_key_under_lmk(TEST_LMK, "001", zpk["cryptogram"])
    # X9.17 (X): plain TDES-ECB under the ZMK, checked with an independent TDES
    x = keys.json("export", "--name", "rt-zpk", "--under", "rt-zmk", "--format", "x917")
    assert x["cryptogram"].startswith("X") and x["kcv"] == zpk["kcv"]
    assert _tdes_ecb(clear_zmk, bytes.fromhex(x["cryptogram"][1:]), True) == clear_zpk
    # another inventory (a partner's, say) holding the same ZMK imports what this one exports
    mine = KeyStore.open(f"sqlite:///{config.parent / 'keys.db'}")
    the_zmk = mine.get("default", "rt-zmk")
    mine.close()

    def partner(fmt: str) -> Keys:
        other = config.parent / f"other-{fmt}.toml"
        other.write_text(config.read_text().replace("sqlite:///keys.db", f"sqlite:///other-{fmt}.db"))
        store = KeyStore.open(f"sqlite:///{config.parent / f'other-{fmt}.db'}")
        store.create(the_zmk, actor="t")
        store.close()
        return Keys(other, keys.capsys)

    for fmt in ("variant", "x917", "tr31"):
        exported = keys.json("export", "--name", "rt-zpk", "--under", "rt-zmk", "--format", fmt)
        assert exported["kcv"] == zpk["kcv"]
        if fmt == "tr31":
            assert exported["cryptogram"].startswith("RB")
        back = partner(fmt).json("import", "--name", f"rt-{fmt}", "--type", "ZPK", "--under", "rt-zmk",
                                 "--cryptogram", exported["cryptogram"], "--kcv", zpk["kcv"])  # fmt: skip
        assert back["kcv"] == zpk["kcv"] == bu_kcv(client, "001", back["cryptogram"])
        assert back["cryptogram"] == zpk["cryptogram"]  # variant encryption under the LMK is deterministic
        assert decrypt_key_under_lmk(TEST_LMK, "001", back["cryptogram"]) == clear_zpk
        # the inventory holding the key already refuses a second record of the same cryptogram
        rc, _, err = keys.run("import", "--name", f"dup-{fmt}", "--type", "ZPK", "--under", "rt-zmk",
                              "--cryptogram", exported["cryptogram"])  # fmt: skip
        assert rc == 1 and "already in the keystore" in err
    actions = [h["action"] for h in keys.json("show", "--name", "rt-zpk")["history"]]
    assert actions == ["created", "exported", "exported", "exported", "exported"]


def test_import_wrong_kcv_refused(keys: Keys) -> None:
    zmk = keys.json("generate", "--name", "w-zmk", "--type", "ZMK")
    clear_zmk = decrypt_key_under_lmk(TEST_LMK, "000", zmk["cryptogram"])
    clear = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    under = "X" + _tdes_ecb(clear_zmk, clear, False).hex().upper()
    kcv = _tdes_ecb(clear, bytes(8), False)[:3].hex().upper()
    rc, out, err = keys.run("import", "--name", "w-zpk", "--type", "ZPK", "--under", "w-zmk",
                            "--cryptogram", under, "--kcv", "000000")  # fmt: skip
    assert rc == 1 and "check value" in err and out == ""
    rc, _, err = keys.run("show", "--name", "w-zpk")
    assert rc == 1 and "no key" in err  # nothing stored
    rec = keys.json("import", "--name", "w-zpk", "--type", "ZPK", "--under", "w-zmk", "--cryptogram", under,
                    "--kcv", kcv)  # fmt: skip
    assert rec["kcv"] == kcv
    assert decrypt_key_under_lmk(TEST_LMK, "001", rec["cryptogram"]) == clear
    rc, _, err = keys.run(
        "import", "--name", "w2", "--type", "ZPK", "--under", "w-zpk", "--cryptogram", under
    )
    assert rc == 1 and "not a ZMK" in err


def test_lifecycle_list_show_inventory(keys: Keys, config: Path) -> None:
    v1 = keys.json("generate", "--name", "life", "--type", "ZPK", "--grace", "1d")
    v2 = keys.json("rotate", "--name", "life")
    assert v2["version"] == 2 and v2["state"] == "active" and v2["kcv"] != v1["kcv"]
    versions = keys.json("show", "--name", "life")["versions"]
    assert [v["state"] for v in versions] == ["grace", "active"] and versions[0]["grace_until"]
    assert keys.json("rollback", "--name", "life")["version"] == 1
    assert [v["state"] for v in keys.json("show", "--name", "life")["versions"]] == ["active", "revoked"]
    rc, _, err = keys.run("destroy", "--name", "life", "--version", "1")
    assert rc == 1 and "active -> destroyed" in err
    assert keys.json("suspend", "--name", "life")["state"] == "suspended"
    assert keys.json("resume", "--name", "life")["state"] == "active"
    assert (
        keys.json("revoke", "--name", "life", "--version", "1", "--reason", "compromised")["state"]
        == "revoked"
    )
    rc, _, err = keys.run("export", "--name", "life", "--version", "1", "--under", "rt-zmk")
    assert rc == 1
    dead = keys.json("destroy", "--name", "life", "--version", "1")
    assert dead["state"] == "destroyed" and dead["cryptogram"] is None
    rc, _, err = keys.run("resume", "--name", "life", "--version", "1")
    assert rc == 1 and "destroyed -> active" in err
    history = keys.json("show", "--name", "life")["history"]
    assert [h["action"] for h in history] == [
        "created", "created", "rotated", "activated", "rolled_back", "revoked", "suspended", "activated",
        "revoked", "destroyed",
    ]  # fmt: skip
    assert {h["actor"] for h in history} == {"tester"} and history[-2]["reason"] == "compromised"
    listed = keys.json("list", "--state", "destroyed")
    assert [(r["name"], r["version"]) for r in listed] == [("life", 1)]
    rc, out, _ = keys.run("list")
    assert rc == 0 and out.splitlines()[0].split()[:5] == ["TENANT", "NAME", "VER", "TYPE", "STATE"]
    assert any(line.split()[1:3] == ["life", "2"] for line in out.splitlines())
    inv = keys.json("inventory")
    assert inv["by_state"]["destroyed"] == 1 and inv["by_state"]["revoked"] == 1
    rc, out, _ = keys.run("inventory")
    assert rc == 0 and "pending rotation" in out
    store = KeyStore.open(f"sqlite:///{config.parent / 'keys.db'}")
    try:
        kinds = [e.kind for e in store.events() if e.name == "life"]
        assert kinds.count("key.revoked") == 2 and kinds[-1] == "key.destroyed"
        assert store.get("default", "life", 1).state is KeyState.DESTROYED
        assert store.is_refused(v1["cryptogram"])  # the tombstone's digest stays refused
    finally:
        store.close()
