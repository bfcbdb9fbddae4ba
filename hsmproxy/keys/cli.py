"""``hsmproxy keys …``: named keys in the keystore — generate, import, export, rotate, revoke, inventory.

Keys are generated, imported and exported INSIDE a node: the proxy's own worker operations
(``generate_key`` = A0, ``import_key`` = A6, ``export_key`` = A8 of :mod:`hsmproxy.ops.keys`) run
against a :class:`~hsmproxy.backend.pkcs11_backend.Pkcs11Backend` opened in a child process (one per
call: a PKCS#11 library reads its configuration once per process, as in the LMK ceremony). The host
never produces key material and never sees a clear key; the keystore holds cryptograms under the
tenant's LMK and check values only.

Key types map to payShield key type codes (:data:`KEY_TYPES`); RSA, EC, HMAC and AES keys are not
supported by this CLI yet and say so. Output is a table by default, JSON with ``--json``. Exit codes:
0 ok, 1 refused or failed (message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hsmproxy.backend.spec import NodeSpec
from hsmproxy.config import ConfigError, Settings, load_settings
from hsmproxy.keys.store import (
    InvalidTransition,
    KeyExists,
    KeyNotFound,
    KeyRecord,
    KeyState,
    KeyStore,
)

#: Key type -> payShield key type code under the LMK.
KEY_TYPES: dict[str, str] = {
    "ZMK": "000", "ZPK": "001", "TPK": "002", "PVK": "002", "CVK": "402", "TAK": "003", "ZAK": "008",
    "BDK": "009", "MK-AC": "109", "DEK": "00B", "ZEK": "00A",
}  # fmt: skip
#: Key types of the issue that this CLI cannot create yet.
UNSUPPORTED_TYPES = ("RSA", "EC", "HMAC", "AES")
#: LMK scheme -> key scheme under a ZMK for ``export --format variant|x917``.
_ZMK_SCHEME = {
    "variant": {"U": "U", "T": "T", "X": "U", "Y": "T"},
    "x917": {"U": "X", "T": "Y", "X": "X", "Y": "Y"},
}
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DEFAULT_KEYSTORE = "sqlite:///var/keys.db"


class CliError(Exception):
    """A refused or failed command: the message goes to stderr, exit code 1."""


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or combinations like ``1d12h`` -> timedelta."""
    parts = _DURATION.findall(text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h, 90m; got {text!r}")
    return timedelta(seconds=sum(int(n) * _UNITS[u] for n, u in parts))


# -- parser -------------------------------------------------------------------------------------------


def add_keys_parser(sub: Any) -> None:
    """Add the ``keys`` subcommand and its actions to the top-level subparsers ``sub``."""
    keys = sub.add_parser("keys", help="named keys: generate, import, export, rotate, revoke, inventory")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    def action(name: str, help_text: str, *, named: bool = True, version: bool = False) -> Any:
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--config", default="config.toml", metavar="PATH")
        p.add_argument("--json", action="store_true", help="JSON output")
        p.add_argument("--actor", default="", help="who does this (default: the OS user)")
        p.add_argument("--tenant", default="default" if named else None, metavar="T")
        if named:
            p.add_argument("--name", required=True, metavar="N")
        if version:
            p.add_argument("--version", type=int, default=None, metavar="V", help="default: see help")
        return p

    def node_args(p: Any) -> None:
        p.add_argument(
            "--node", default=None, metavar="NAME", help="node to run on (default: first that opens)"
        )

    gen = action("generate", "generate a key inside a node and store it as version 1")
    gen.add_argument("--type", required=True, dest="key_type", metavar="TYPE")
    gen.add_argument("--scheme", default="U", choices=("U", "T", "S"), help="key scheme under the LMK")
    gen.add_argument("--rotate-every", type=parse_duration, default=None, metavar="DUR")
    gen.add_argument("--grace", type=parse_duration, default=None, metavar="DUR")
    node_args(gen)

    imp = action("import", "import a key from under a ZMK (or a TR-31 R block) into the LMK")
    imp.add_argument("--type", required=True, dest="key_type", metavar="TYPE")
    imp.add_argument("--under", required=True, metavar="ZMK", help="name of the ZMK in the keystore")
    imp.add_argument("--cryptogram", required=True, help="key under the ZMK ([scheme]hex) or R + TR-31 block")
    imp.add_argument("--kcv", default=None, help="expected check value (refused when it differs)")
    imp.add_argument("--scheme", default=None, choices=("U", "T", "S"), help="scheme under LMK (auto)")
    imp.add_argument("--rotate-every", type=parse_duration, default=None, metavar="DUR")
    imp.add_argument("--grace", type=parse_duration, default=None, metavar="DUR")
    node_args(imp)

    exp = action("export", "export a key to under a ZMK", version=True)
    exp.add_argument("--under", required=True, metavar="ZMK")
    exp.add_argument("--format", default="variant", choices=("variant", "x917", "tr31"))
    node_args(exp)

    action("list", "list keys", named=False).add_argument(
        "--state", default=None, choices=[s.value for s in KeyState]
    )
    action("show", "every version and the history of a key")
    rot = action("rotate", "generate the next version; the current one enters its grace period")
    rot.add_argument("--grace", type=parse_duration, default=None, metavar="DUR")
    node_args(rot)
    action("rollback", "back to the previous version (still in grace); the latest is revoked")
    action("suspend", "suspend a version (default: the active one)", version=True)
    action("resume", "re-activate a suspended version (default: the latest)", version=True)
    rev = action(
        "revoke", "revoke a version (default: the latest); its cryptogram is refused (29)", version=True
    )
    rev.add_argument("--reason", required=True)
    destroy = action(
        "destroy", "erase a version's cryptogram (tombstone kept; default: the latest)", version=True
    )
    destroy.add_argument("--reason", default="")
    action("inventory", "counts by state, expiring keys, keys pending rotation", named=False)


# -- nodes ----------------------------------------------------------------------------------------------


def _node_op(spec: NodeSpec, name: str, args: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """In a child process: open the node's token and run worker operation ``name`` once."""
    os.environ.update(spec.env)
    from hsmproxy.backend.errors import BackendError
    from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
    from hsmproxy.ops import load_all
    from hsmproxy.ops.registry import OPS

    load_all()
    backend = Pkcs11Backend(spec.module, spec.token_label, spec.read_pin(), strict_key_custody=False)
    try:
        code, values = OPS[name](backend, args)
    except BackendError as exc:
        return exc.code, {}
    finally:
        backend.close()
    return code, {k: v if isinstance(v, str) else v.hex().upper() for k, v in values.items()}


def run_on_node(
    settings: Settings, node: str | None, name: str, args: dict[str, Any]
) -> tuple[str, dict[str, str]]:
    """Run operation ``name`` on ``node`` (or the first node whose token opens) in a child process."""
    specs = [n for n in settings.nodes if node is None or n.name == node]
    if not specs:
        raise CliError(f"no node named {node!r}")
    errors = []
    for spec in specs:
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                return pool.submit(_node_op, spec, name, args).result()
        except Exception as exc:  # a node that cannot be opened: try the next one
            errors.append(f"{spec.name}: {type(exc).__name__}: {exc}")
    raise CliError("no node could run the operation (" + "; ".join(errors) + ")")


def _lmk_args(settings: Settings, tenant: str) -> dict[str, Any]:
    t = settings.tenants.get(tenant)
    if t is None:
        raise CliError(f"unknown tenant {tenant!r}")
    return {"lmk_id": None, "default_lmk": t.default_lmk, "lmk_ids": list(t.lmk_ids)}


def _type_code(key_type: str) -> str:
    key_type = key_type.upper()
    if key_type in UNSUPPORTED_TYPES:
        raise CliError(f"key type {key_type}: not supported yet (supported: {', '.join(KEY_TYPES)})")
    if key_type not in KEY_TYPES:
        raise CliError(f"unknown key type {key_type!r} (supported: {', '.join(KEY_TYPES)})")
    return KEY_TYPES[key_type]


def _lmk_of(settings: Settings, tenant: str, cryptogram: str) -> str:
    t = settings.tenants[tenant]
    return t.keyblock_lmk if cryptogram.startswith("S") else t.default_lmk


def _usable(store: KeyStore, tenant: str, name: str) -> KeyRecord:
    """The ACTIVE version of ``tenant/name`` (refused otherwise)."""
    versions = [r for r in store.versions(tenant, name) if r.state is KeyState.ACTIVE]
    if not versions or versions[-1].cryptogram is None:
        raise CliError(f"{tenant}/{name} has no active version")
    return versions[-1]


def _generate(
    settings: Settings, a: argparse.Namespace, tenant: str, key_type: str, scheme: str
) -> dict[str, str]:
    code = _type_code(key_type)
    args = {**_lmk_args(settings, tenant), "mode": "0", "key_type": code, "key_scheme_lmk": scheme}
    args.update(
        dict.fromkeys(("kb_usage", "kb_algorithm", "kb_mode_of_use", "kb_version", "kb_exportability"))
    )
    err, values = run_on_node(settings, a.node, "generate_key", args)
    if err != "00":
        raise CliError(f"generate on the node failed with error {err}")
    return values


def _new_record(settings: Settings, tenant: str, name: str, version: int, key_type: str,
                cryptogram: str, kcv: str, state: KeyState, rotate_every: timedelta | None,
                grace: timedelta | None) -> KeyRecord:  # fmt: skip
    now = datetime.now(UTC)
    return KeyRecord(
        tenant=tenant, name=name, version=version, key_type=key_type.upper(), type_code=_type_code(key_type),
        lmk_id=_lmk_of(settings, tenant, cryptogram), cryptogram=cryptogram, kcv=kcv[:6].upper(), state=state,
        activation_date=None, expiry_date=None, grace_until=None, rotate_every=rotate_every,
        grace_period=grace, created_at=now, updated_at=now, created_by="",
    )  # fmt: skip


# -- actions -------------------------------------------------------------------------------------------


def _do_generate(store: KeyStore, settings: Settings, a: argparse.Namespace, actor: str) -> Any:
    if store.versions(a.tenant, a.name):
        raise CliError(f"{a.tenant}/{a.name} exists; use `keys rotate` for a new version")
    values = _generate(settings, a, a.tenant, a.key_type, a.scheme)
    record = _new_record(settings, a.tenant, a.name, 1, a.key_type, values["key_lmk"], values["kcv"],
                         KeyState.ACTIVE, a.rotate_every, a.grace)  # fmt: skip
    return store.create(record, actor=actor, reason="generated")


def _import_scheme(cryptogram: str) -> list[str]:
    """Candidate LMK schemes for a key under a ZMK (TR-31 blocks: by length, tried in turn)."""
    if cryptogram.startswith("R"):
        return ["S"] if cryptogram[8:9] == "A" else ["U", "T"]
    body = cryptogram[1:] if cryptogram[:1] in "XUYTZ" else cryptogram
    return ["T"] if len(body) == 48 else ["U"]


def _do_import(store: KeyStore, settings: Settings, a: argparse.Namespace, actor: str) -> Any:
    if store.versions(a.tenant, a.name):
        raise CliError(f"{a.tenant}/{a.name} exists")
    zmk = _usable(store, a.tenant, a.under)
    if zmk.key_type != "ZMK":
        raise CliError(f"{a.under} is a {zmk.key_type}, not a ZMK")
    code = _type_code(a.key_type)
    err, values = "15", dict[str, str]()
    for scheme in [a.scheme] if a.scheme else _import_scheme(a.cryptogram):
        args = {**_lmk_args(settings, a.tenant), "command": "A6", "key_type": code, "zmk": zmk.cryptogram,
                "key_zmk": a.cryptogram, "key_scheme_lmk": scheme}  # fmt: skip
        args.update(
            dict.fromkeys(("kb_usage", "kb_algorithm", "kb_mode_of_use", "kb_version", "kb_exportability"))
        )
        err, values = run_on_node(settings, a.node, "import_key", args)
        if err != "27":
            break
    if err == "01":
        raise CliError("refused: the imported key does not have odd parity")
    if err != "00":
        raise CliError(f"import on the node failed with error {err}")
    if a.kcv is not None:
        want = a.kcv.strip().upper()
        if len(want) < 4 or not values["kcv"].startswith(want[:6]):
            raise CliError("refused: the check value does not match the imported key")
    record = _new_record(settings, a.tenant, a.name, 1, a.key_type, values["key_lmk"], values["kcv"],
                         KeyState.ACTIVE, a.rotate_every, a.grace)  # fmt: skip
    return store.create(record, actor=actor, reason=f"imported under {a.under}")


def _do_export(store: KeyStore, settings: Settings, a: argparse.Namespace, actor: str) -> Any:
    key = store.get(a.tenant, a.name, a.version) if a.version else _usable(store, a.tenant, a.name)
    if key.cryptogram is None or store.is_refused(key.cryptogram) or key.state is KeyState.PRE_ACTIVE:
        raise CliError(f"{a.tenant}/{a.name} version {key.version} is {key.state.value}: refused")
    zmk = _usable(store, a.tenant, a.under)
    if zmk.key_type != "ZMK":
        raise CliError(f"{a.under} is a {zmk.key_type}, not a ZMK")
    if a.format == "tr31":
        scheme = "R"
    else:
        scheme = _ZMK_SCHEME[a.format].get(key.cryptogram[:1], "")
        if not scheme:
            raise CliError(f"a {key.cryptogram[:1]} key exports with --format tr31 only")
    args = {**_lmk_args(settings, a.tenant), "key_type": key.type_code, "zmk": zmk.cryptogram,
            "key_lmk": key.cryptogram, "key_scheme_zmk": scheme}  # fmt: skip
    err, values = run_on_node(settings, a.node, "export_key", args)
    if err != "00":
        raise CliError(f"export on the node failed with error {err}")
    store.note(a.tenant, a.name, key.version, actor=actor, action="exported", reason=f"under {a.under}")
    return {"tenant": a.tenant, "name": a.name, "version": key.version, "under": a.under,
            "format": a.format, "cryptogram": values["key_zmk"], "kcv": values["kcv"]}  # fmt: skip


def _do_rotate(store: KeyStore, settings: Settings, a: argparse.Namespace, actor: str) -> Any:
    current = _usable(store, a.tenant, a.name)
    assert current.cryptogram is not None
    scheme = "S" if current.cryptogram.startswith("S") else "T" if current.cryptogram[:1] in "TY" else "U"
    values = _generate(settings, a, a.tenant, current.key_type, scheme)
    version = store.next_version(a.tenant, a.name)
    new = _new_record(settings, a.tenant, a.name, version, current.key_type, values["key_lmk"], values["kcv"],
                      KeyState.PRE_ACTIVE, current.rotate_every, current.grace_period)  # fmt: skip
    store.create(new, actor=actor, reason="rotation")
    grace = a.grace if a.grace is not None else current.grace_period or timedelta(0)
    store.transition(a.tenant, a.name, current.version, KeyState.GRACE, actor=actor, reason="rotated",
                     grace_until=datetime.now(UTC) + grace)  # fmt: skip
    return store.transition(a.tenant, a.name, version, KeyState.ACTIVE, actor=actor, reason="rotation")


def _do_rollback(store: KeyStore, a: argparse.Namespace, actor: str) -> Any:
    versions = store.versions(a.tenant, a.name)
    if not versions:
        raise KeyNotFound(f"no key {a.tenant}/{a.name}")
    latest = versions[-1]
    previous = [r for r in versions[:-1] if r.state is KeyState.GRACE]
    if latest.state is not KeyState.ACTIVE or not previous:
        raise CliError("rollback needs an active latest version and a previous version in grace")
    restored = store.transition(a.tenant, a.name, previous[-1].version, KeyState.ACTIVE, actor=actor,
                                reason=f"rollback from version {latest.version}")  # fmt: skip
    store.transition(a.tenant, a.name, latest.version, KeyState.REVOKED, actor=actor, reason="rolled back")
    return restored


def _version_for(store: KeyStore, a: argparse.Namespace, prefer: KeyState | None = None) -> int:
    if a.version is not None:
        return int(a.version)
    versions = store.versions(a.tenant, a.name)
    if not versions:
        raise KeyNotFound(f"no key {a.tenant}/{a.name}")
    preferred = [r for r in versions if r.state is prefer]
    return (preferred or versions)[-1].version


def _act(store: KeyStore, settings: Settings, a: argparse.Namespace, actor: str) -> Any:
    cmd = a.keys_command
    if cmd == "generate":
        return _do_generate(store, settings, a, actor)
    if cmd == "import":
        return _do_import(store, settings, a, actor)
    if cmd == "export":
        return _do_export(store, settings, a, actor)
    if cmd == "rotate":
        return _do_rotate(store, settings, a, actor)
    if cmd == "rollback":
        return _do_rollback(store, a, actor)
    if cmd == "list":
        return store.list(a.tenant, KeyState(a.state) if a.state else None)
    if cmd == "show":
        versions = store.versions(a.tenant, a.name)
        if not versions:
            raise KeyNotFound(f"no key {a.tenant}/{a.name}")
        return {"versions": versions, "history": store.history(a.tenant, a.name)}
    if cmd == "inventory":
        return store.inventory(datetime.now(UTC))
    target = {"suspend": KeyState.SUSPENDED, "resume": KeyState.ACTIVE, "revoke": KeyState.REVOKED,
              "destroy": KeyState.DESTROYED}[cmd]  # fmt: skip
    prefer = {"suspend": KeyState.ACTIVE, "resume": KeyState.SUSPENDED}.get(cmd)
    version = _version_for(store, a, prefer)
    try:
        return store.transition(
            a.tenant, a.name, version, target, actor=actor, reason=str(vars(a).get("reason") or "")
        )
    except InvalidTransition as exc:
        hint = " (suspend or revoke it first)" if cmd == "destroy" else ""
        raise CliError(f"refused: {exc}{hint}") from None


# -- output ---------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, KeyRecord):
        return value.to_json()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _table(rows: list[list[str]]) -> str:
    """``rows[0]`` is the header (the console's table layout)."""
    from hsmproxy.server.console import table

    return table(rows[0], rows[1:])


def _day(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def _records_table(records: list[KeyRecord]) -> str:
    rows = [["TENANT", "NAME", "VER", "TYPE", "STATE", "KCV", "ACTIVATED", "EXPIRES", "GRACE UNTIL"]]
    rows += [[r.tenant, r.name, str(r.version), r.key_type, r.state.value, r.kcv, _day(r.activation_date),
              _day(r.expiry_date), _day(r.grace_until)] for r in records]  # fmt: skip
    return _table(rows)


def _render(value: Any) -> str:
    if isinstance(value, KeyRecord):
        return _records_table([value])
    if isinstance(value, list):
        return _records_table(value) if value else "(no keys)"
    if "versions" in value:
        hist = [["AT", "ACTOR", "VER", "ACTION", "FROM", "TO", "REASON"]]
        hist += [[h["at"][:19], h["actor"], str(h["version"]), h["action"], h["from_state"] or "-",
                  h["to_state"] or "-", h["reason"]] for h in value["history"]]  # fmt: skip
        return _records_table(value["versions"]) + "\n\n" + _table(hist)
    if "by_state" in value:
        rows = [["STATE", "COUNT"]] + [[k, str(v)] for k, v in value["by_state"].items()]
        rows += [["total", str(value["total"])], ["expiring within 7 days", str(value["expiring_7d"])],
                 ["expiring within 30 days", str(value["expiring_30d"])],
                 ["pending rotation", str(value["pending_rotation"])]]  # fmt: skip
        return _table(rows)
    return _table([[str(k), str(v)] for k, v in value.items()])


def keystore_url(settings: Settings) -> str:
    """The configured keystore URL (``[keystore] url``; default ``var/keys.db`` next to the config)."""
    if settings.keystore is not None and settings.keystore.url:
        return settings.keystore.url
    base = Path(settings.source).resolve().parent if settings.source else Path.cwd()
    return "sqlite:///" + str(base / DEFAULT_KEYSTORE[len("sqlite:///") :])


def run_keys(args: argparse.Namespace) -> int:
    """Entry for ``hsmproxy keys …``; returns the exit code."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    actor = args.actor or os.environ.get("USER") or getpass.getuser()
    store = KeyStore.open(keystore_url(settings))
    try:
        result = _act(store, settings, args, actor)
    except (CliError, KeyNotFound, KeyExists, InvalidTransition) as exc:
        print(f"keys {args.keys_command}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.json:
        print(json.dumps(_jsonable(result), indent=2, sort_keys=True))
    else:
        print(_render(result))
    return 0


__all__ = [
    "KEY_TYPES",
    "CliError",
    "add_keys_parser",
    "keystore_url",
    "parse_duration",
    "run_keys",
    "run_on_node",
]
