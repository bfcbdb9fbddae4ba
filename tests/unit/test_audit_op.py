"""The node's audit operations: checkpoint signing on a real SoftHSM2 token, and format-1 MACs."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.audit import audit_mac, audit_pubkey, audit_sign, generate_signing_key, sign_label

KEY = bytes(range(32))
MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class _Key:
    def sign(self, data: bytes, mechanism: Any = None) -> bytes:
        return hmac.new(KEY, data, hashlib.sha256).digest()


class _Backend:
    def lmk_object(self, label: str) -> _Key:
        assert label == "hsmproxy-audit:00"
        return _Key()


def test_format_1_macs_are_hmac_sha256_over_the_canonical_record() -> None:
    bodies = [json.dumps({"seq": 0, "kind": "hostcmd", "result": "00", "prev": "0" * 64, "mac": "x"})]
    code, values = audit_mac(cast(Pkcs11Backend, _Backend()), {"bodies": bodies})
    canonical = b'{"kind":"hostcmd","prev":"' + b"0" * 64 + b'","result":"00","seq":0}'
    assert code == "00" and values["macs"] == hmac.new(KEY, canonical, hashlib.sha256).hexdigest()
    with pytest.raises(BackendError) as err:
        audit_mac(cast(Pkcs11Backend, _Backend()), {"bodies": ["[1]"]})
    assert err.value.code == "15"


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh SoftHSM2 token's configuration file (the token is used in child processes only)."""
    if shutil.which("softhsm2-util") is None or not Path(MODULE).exists():
        pytest.skip("SoftHSM2 is not installed (make test installs it)")
    root = tmp_path_factory.mktemp("token")
    (root / "tokens").mkdir()
    path = root / "softhsm2.conf"
    path.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    init = ["softhsm2-util", "--init-token", "--free", "--label", "t", "--pin", "1234", "--so-pin", "1234"]
    subprocess.run(init, env={**os.environ, "SOFTHSM2_CONF": str(path)}, check=True, capture_output=True)
    return path


def _code(fn: Any, *args: Any) -> str:
    try:
        fn(*args)
    except BackendError as exc:
        return exc.code
    return "00"


def _exercise(conf: str, digests: list[str]) -> dict[str, Any]:
    """Child process: make the signing key in the token, sign, replace it; what was seen."""
    from pkcs11 import Attribute, ObjectClass

    os.environ["SOFTHSM2_CONF"] = conf
    token = Pkcs11Backend(MODULE, "t", "1234")
    try:
        seen: dict[str, Any] = {"before": _code(audit_sign, token, {"key_id": "00", "digest": "ab" * 32})}
        seen["made"], seen["der"] = generate_signing_key(token, "00")
        seen["again"], seen["same"] = generate_signing_key(token, "00")
        private = token.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=sign_label("00"))
        seen["attrs"] = (
            private[Attribute.SENSITIVE],
            private[Attribute.EXTRACTABLE],
            private[Attribute.TOKEN],
        )
        seen["pubkey"] = audit_pubkey(token, {"key_id": "00"})
        seen["signed"] = [audit_sign(token, {"key_id": "00", "digest": d}) for d in digests]
        seen["bad"] = [_code(audit_sign, token, {"key_id": "00", "digest": d}) for d in BAD_DIGESTS]
        _, seen["new_der"] = generate_signing_key(token, "00", replace=True)
        seen["after_replace"] = audit_sign(token, {"key_id": "00", "digest": digests[0]})
    finally:
        token.close()
    return seen


BAD_DIGESTS = ["", "AB" * 32, "ab" * 31, "zz" * 32, "ab" * 33]


def test_a_signing_key_made_in_the_token_signs_what_cryptography_verifies(conf: Path) -> None:
    from hsmproxy.backend.offline import in_child

    digest = hashlib.sha256(b"a checkpoint statement").digest()
    seen = in_child(_exercise, str(conf), [digest.hex()])
    assert seen["before"] == "13"  # no key yet
    der = seen["der"]
    assert seen["made"] and not seen["again"] and seen["same"] == der  # never replaced unless asked
    assert seen["attrs"] == (True, False, True)  # sensitive, not extractable, on the token
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1)
    assert seen["pubkey"] == ("00", {"spki": der.hex()})
    code, values = seen["signed"][0]
    raw = bytes.fromhex(str(values["sig"]))
    assert code == "00" and len(raw) == 64 and values["signer"] == hashlib.sha256(der).hexdigest()
    signature = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))  # raises if wrong
    assert seen["bad"] == ["15"] * len(BAD_DIGESTS)  # a malformed digest
    # a replaced key pair is picked up at the next signature (the old handle is gone)
    assert seen["new_der"] != der
    assert seen["after_replace"][1]["signer"] == hashlib.sha256(seen["new_der"]).hexdigest()
