"""Console users: scrypt password hashes (RFC 7914 vector), user validation, the role matrix, masking,
``hsmproxy console passwd`` and ``hsmproxy check`` on console users."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import pytest

from hsmproxy.cli import main
from hsmproxy.config import ConfigError, load_settings
from hsmproxy.console_client import completer
from hsmproxy.server.console import (
    REQUIRED_ROLE,
    ConsoleUser,
    hash_password,
    masked,
    may_run,
    parse_console_users,
    run_passwd,
    verify_password,
)

#: RFC 7914 section 12, third vector: scrypt("pleaseletmein", "SodiumChloride", N=16384, r=8, p=1, 64).
RFC_DIGEST = bytes.fromhex(
    "7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"
    "d5432955613f0fcf62d49705242a9af9e61e85dc0d651e40dfcf017b45575887"
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_verify_against_the_rfc_7914_vector() -> None:
    encoded = f"scrypt$14$8$1${_b64(b'SodiumChloride')}${_b64(RFC_DIGEST)}"
    assert verify_password("pleaseletmein", encoded)
    assert not verify_password("pleaseletmeIn", encoded)
    assert not verify_password("pleaseletmein", encoded.replace("$14$", "$13$"))
    assert not verify_password("pleaseletmein", "plain-text-password")


def test_hash_password_format_and_salt() -> None:
    salt = bytes(range(16))
    encoded = hash_password("correct horse", salt=salt, log2_n=10)
    expected = hashlib.scrypt(b"correct horse", salt=salt, n=1024, r=8, p=1, dklen=32)
    assert encoded == f"scrypt$10$8$1${_b64(salt)}${_b64(expected)}"
    assert verify_password("correct horse", encoded) and not verify_password("correct horsE", encoded)
    a, b = hash_password("same", log2_n=10), hash_password("same", log2_n=10)
    assert a != b and verify_password("same", a) and verify_password("same", b)  # random salts


def _user(**kw: str) -> dict[str, str]:
    return {"name": "alice", "role": "admin", "password_hash": hash_password("pw-123456", log2_n=10)} | kw


def test_parse_console_users() -> None:
    users = parse_console_users([_user(), _user(name="bob", role="auditor")], ("127.0.0.1", 9998))
    assert [(u.name, u.role) for u in users] == [("alice", "admin"), ("bob", "auditor")]
    assert "password_hash" not in repr(users[0]) and "scrypt" not in repr(users[0])
    assert parse_console_users(None, ("127.0.0.1", 9998)) == ()
    assert parse_console_users([], ("::1", 9998)) == ()
    assert parse_console_users([_user()], ("0.0.0.0", 9998))[0].name == "alice"
    cases = [
        ([_user(role="root")], "console.users[0]: role must be one of auditor, operator, admin, not 'root'"),
        ([_user(), _user()], "console.users[1]: duplicate user 'alice'"),
        ([_user(name="a b")], "console.users[0]: name must be 1-64 of A-Z a-z 0-9 _ . @ -"),
        ([_user(password_hash="secret")], "console.users[0] (alice): password_hash: not scrypt$"),
        ([_user(password="x")], "console.users[0]: unknown keys ['password']"),
        ([_user(password_hash="scrypt$30$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==")], "out of range"),
        ({"name": "x"}, "console.users: expected a list of tables"),
    ]
    for raw, message in cases:
        with pytest.raises(ValueError) as exc:
            parse_console_users(raw, ("127.0.0.1", 9998))
        assert message in str(exc.value)
        assert "pw-123456" not in str(exc.value)
    with pytest.raises(ValueError, match="not a loopback address: configure"):
        parse_console_users([], ("10.0.0.5", 9998))


def test_role_matrix() -> None:
    expected = {
        "auditor": {"VR", "QH", "GETCMDS", "SHOW", "AUDIT"},
        "operator": {"VR", "QH", "GETCMDS", "SHOW", "AUDIT", "SET NODE", "KILL CLIENT", "RELOAD"},
        "admin": set(REQUIRED_ROLE),
    }
    for role, allowed in expected.items():
        assert {c for c in REQUIRED_ROLE if may_run(role, c)} == allowed, role
    assert {"CONFIGCMDS", "CONFIGPB", "SHUTDOWN"} <= set(REQUIRED_ROLE)
    for command in REQUIRED_ROLE:
        assert not may_run(None, command) and not may_run("guest", command)
    for command in ("HELP", "QUIT", "LOGIN", "WHOAMI"):
        assert may_run(None, command)


def test_masked_settings() -> None:
    user = ConsoleUser("alice", "admin", hash_password("pw-123456", log2_n=10))
    data = masked(
        {
            "nodes": [{"name": "a", "pin_file": "/etc/pin", "pin_env": "PIN_A"}],
            "users": [user],
            "keystore": {"url": "postgresql://hsm:s3cret@db:5432/hsmproxy", "secret": b"xyz"},
            "tls": {"cert": "server.pem", "key": "server.key"},
            "codes": frozenset({"CC", "BA"}),
        }
    )
    assert data == {
        "nodes": [{"name": "a", "pin_file": "***", "pin_env": "PIN_A"}],
        "users": [{"name": "alice", "role": "admin", "password_hash": "***"}],
        "keystore": {"url": "postgresql://hsm:***@db:5432/hsmproxy", "secret": "***"},
        "tls": {"cert": "server.pem", "key": "***"},
        "codes": ["BA", "CC"],
    }


def test_passwd_prints_a_verifiable_hash(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert run_passwd(io.StringIO("long enough password\n"), out) == 0
    encoded = out.getvalue().strip()
    assert encoded.startswith("scrypt$14$8$1$") and verify_password("long enough password", encoded)
    assert run_passwd(io.StringIO("short\n"), io.StringIO()) == 1
    assert "at least 8 characters" in capsys.readouterr().err


CONFIG = """
[[listeners]]
name = "host"
bind = "127.0.0.1:1500"
[[nodes]]
name = "node-a"
pin_file = "pin"
[proxy]
drain_timeout = 7.5
[console]
bind = "{bind}"
{users}
"""


def _config(tmp_path: Path, bind: str = "127.0.0.1:9998", users: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(bind=bind, users=users))
    return path


def test_load_settings_and_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # main() would install a log handler on pytest's captured (soon closed) stderr
    monkeypatch.setattr("hsmproxy.logs.configure_logging", lambda *a, **k: None)
    encoded = hash_password("pw-123456", log2_n=10)
    good = f'[[console.users]]\nname = "alice"\nrole = "operator"\npassword_hash = "{encoded}"'
    settings = load_settings(_config(tmp_path, "0.0.0.0:9998", good))
    assert [(u.name, u.role) for u in settings.console_users] == [("alice", "operator")]
    assert settings.drain_timeout == 7.5
    assert main(["check", "--config", str(tmp_path / "config.toml")]) == 0
    assert "1 console users" in capsys.readouterr().out
    bad = good.replace("operator", "superuser")
    assert main(["check", "--config", str(_config(tmp_path, users=bad))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("config error: console.users[0]: role must be one of auditor, operator, admin")
    assert main(["check", "--config", str(_config(tmp_path, bind="192.0.2.1:9998"))]) == 1
    assert "is not a loopback address: configure [[console.users]]" in capsys.readouterr().err
    wrong_type = _write(tmp_path, CONFIG.format(bind="127.0.0.1:1", users="").replace("= 7.5", '= "x"'))
    assert main(["check", "--config", str(wrong_type)]) == 1
    assert "config error: proxy.drain_timeout: expected seconds" in capsys.readouterr().err
    wrong_type.write_text(
        CONFIG.format(bind="127.0.0.1:1", users="").replace('"host"', '"host"\nheader_length = "x"')
    )
    assert main(["check", "--config", str(wrong_type)]) == 1
    assert capsys.readouterr().err.startswith(f"config error: {wrong_type}: ValueError")
    with pytest.raises(ConfigError, match="drain_timeout must not be negative"):
        load_settings(_write(tmp_path, CONFIG.format(bind="127.0.0.1:1", users="").replace("7.5", "-1")))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "other.toml"
    path.write_text(text)
    return path


def test_completion_of_command_words() -> None:
    complete = completer()
    assert [complete("SH", i) for i in range(3)] == ["SHOW", "SHUTDOWN", None]
    assert complete("con", 0) == "config" and complete("con", 1) == "configcmds"
    assert complete("XYZ", 0) is None
