#!/usr/bin/env python3
"""Cost of one SoftHSM2 DES3-ECB operation by object kind, in a throw-away token (BENCHMARKS.md).

    .venv/bin/python scripts/softhsm_micro.py

Creates a temporary token, a private token key (as the LMK ceremony makes them), private and
non-private session keys (the worker's working keys before and after) and a session copy of the
token key (the worker's LMK handle), and prints the best and median microseconds per decrypt over
5 rounds of 5,000 calls through python-pkcs11, interleaved so that drift hits every kind alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
VALUE = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
LABEL, PIN = "micro", "1234"  # a throw-away token in a temp dir


def main() -> None:
    """Set up the token in a temp dir, then measure in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "softhsm2.conf"
        (Path(tmp) / "tokens").mkdir()
        conf.write_text(
            f"directories.tokendir = {tmp}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        init = ["softhsm2-util", "--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", PIN]
        subprocess.run(init, check=True, capture_output=True)  # noqa: S603 - the system's softhsm2-util
        measure()


def measure() -> None:
    """Print µs per DES3-ECB decrypt for each object kind."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    session = pkcs11.lib(MODULE).get_token(token_label=LABEL).open(user_pin=PIN, rw=True)

    def key(token: bool, private: bool) -> object:
        return session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.DES2,
                Attribute.VALUE: VALUE, Attribute.TOKEN: token, Attribute.PRIVATE: private,
                Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
            }
        )  # fmt: skip

    token_key = key(True, True)
    kinds = {
        "token object, private (an LMK)": token_key,
        "session copy of it (worker's LMK handle)": token_key.copy({Attribute.TOKEN: False}),  # type: ignore[attr-defined]
        "session object, private (working key before)": key(False, True),
        "session object, not private (working key now)": key(False, False),
    }
    block = bytes(8)
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(5):
        for name, obj in kinds.items():
            start = time.perf_counter()
            for _ in range(5000):
                obj.decrypt(block, mechanism=Mechanism.DES3_ECB)  # type: ignore[attr-defined]
            times[name].append((time.perf_counter() - start) / 5000 * 1e6)
    for name, samples in times.items():
        samples.sort()
        print(f"{name:48s} best {samples[0]:5.1f} us   median {samples[2]:5.1f} us")
    for private in (True, False):
        start = time.perf_counter()
        for _ in range(2000):
            key(False, private).destroy()  # type: ignore[attr-defined]
        per = (time.perf_counter() - start) / 2000 * 1e6
        print(f"create + destroy session key, private={private!s:5s}     {per:5.1f} us")
    token_key.destroy()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
