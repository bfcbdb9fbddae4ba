"""``hsmproxy audit verify|prove|verify-proof|keys``: the trail checked offline, proofs, signing keys.

* ``verify PATH... [--keys PEM] [--live] [--witness FILE]``: format-2 files are checked with the pinned
  public keys alone (``--keys``, default ``[audit] trusted_keys`` of ``--config``); format-1 files
  (HMAC chains) need a node of ``--config`` to recompute MACs. Exit 0 intact, 1 not, 2 usage errors.
* ``prove SEQ PATH... [--out FILE]``: the inclusion proof of one record (JSON).
* ``verify-proof FILE [--keys PEM]``: checks a proof against its signed checkpoint.
* ``keys [--generate [--replace]] [--node NAME] [--out PEM]``: each node's checkpoint signing key (its
  fingerprint); ``--generate`` makes the key pair inside the nodes that lack one; ``--out`` writes the
  public keys to pin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hsmproxy.audit.checkpoint import KeyFileError, PinnedKeys, fingerprint, pem_bundle
from hsmproxy.audit.v1 import is_version1, verify_v1
from hsmproxy.audit.verify import ProofError, VerifyReport, prove, read_witness, verify_proof, verify_trail


def add_audit_parser(sub: Any) -> None:
    """The ``audit`` subcommand and its verbs."""
    aud = sub.add_parser("audit", help="the tamper-evident audit trail")
    verbs = aud.add_subparsers(dest="audit_command", required=True)
    ver = verbs.add_parser("verify", help="check the chain, trees and signatures of audit files offline")
    ver.add_argument("paths", nargs="+", metavar="PATH", help="audit file(s), rotated ones included")
    ver.add_argument(
        "--keys", default="", metavar="PEM", help="pinned public keys (default [audit] trusted_keys)"
    )
    ver.add_argument("--config", default="config.toml", metavar="PATH")
    ver.add_argument("--live", action="store_true", help="the newest file is still being written")
    ver.add_argument(
        "--witness",
        default="",
        metavar="FILE",
        help="checkpoints a SIEM received (syslog or JSON lines): each must be in the trail",
    )
    ver.add_argument("--node", default="", metavar="NAME", help="format-1 files: node computing the MACs")
    ver.add_argument("--hmac-key-id", default="00", metavar="NN", help="format-1 files: the HMAC key id")
    pro = verbs.add_parser("prove", help="the inclusion proof of one record")
    pro.add_argument("seq", type=int, metavar="SEQ")
    pro.add_argument("paths", nargs="+", metavar="PATH")
    pro.add_argument("--out", default="", metavar="FILE", help="write the proof here (default: stdout)")
    vp = verbs.add_parser("verify-proof", help="check an inclusion proof against its signed checkpoint")
    vp.add_argument("proof", metavar="FILE")
    vp.add_argument("--keys", default="", metavar="PEM")
    vp.add_argument("--config", default="config.toml", metavar="PATH")
    keys = verbs.add_parser("keys", help="the nodes' checkpoint signing keys (generate, export to pin)")
    keys.add_argument("--config", default="config.toml", metavar="PATH")
    keys.add_argument("--node", default="", metavar="NAME", help="only this node")
    keys.add_argument("--generate", action="store_true", help="make a key pair inside each node lacking one")
    keys.add_argument(
        "--replace", action="store_true", help="with --generate: a new pair even where one exists"
    )
    keys.add_argument("--out", default="", metavar="PEM", help="write the public keys to pin to this file")


def _pinned(keys: str, config: str) -> PinnedKeys:
    if not keys:
        from hsmproxy.audit.settings import load_audit_settings

        settings = load_audit_settings(config) if Path(config).is_file() else None
        keys = settings.trusted_keys if settings is not None else ""
    if not keys:
        raise KeyFileError(
            "no pinned keys: give --keys PEM (written by `hsmproxy audit keys --out`) "
            "or set [audit] trusted_keys"
        )
    return PinnedKeys.load(keys)


def _print_report(report: VerifyReport, what: str) -> None:
    for file, line, seq, lost, why in report.gaps:
        print(f"{file}:{line} (seq {seq}): gap: {lost} record(s) were lost before this point ({why})")
    for note in report.notes:
        print(f"note: {note}")
    for p in report.problems:
        print(p)
    if report.unsealed is not None:
        first, last = report.unsealed
        print(f"unsealed: seq {first}..{last} after the last checkpoint (not yet under a signature)")
    state = "intact" if report.ok else f"NOT intact ({len(report.problems)} problems)"
    print(
        f"{report.files} files, {report.records} records, {report.checkpoints} checkpoints, "
        f"{report.sealed} records sealed{what}: {state}"
    )


def _verify(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not Path(p).is_file()]
    if missing:
        print(f"no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    v1 = [p for p in args.paths if is_version1(Path(p))]
    v2 = [p for p in args.paths if p not in v1]
    failed = False
    if v2:
        try:
            pinned = _pinned(args.keys, args.config)
            witness = read_witness(args.witness) if args.witness else None
        except (KeyFileError, OSError) as exc:
            print(exc, file=sys.stderr)
            return 2
        report = verify_trail(v2, pinned, live=args.live, witness=witness)
        signers = f", signed by {len(report.signers)} key(s)" if report.signers else ""
        _print_report(report, signers)
        failed = not report.ok
    if v1:
        code = _verify_v1(args, v1)
        if code == 2:
            return 2
        failed = failed or code != 0
    return 1 if failed else 0


def _node_macs(spec: Any, key_id: str, bodies: list[str]) -> list[str]:
    """Child process: MACs of format-1 bodies with the node's audit HMAC key."""
    from hsmproxy.backend.offline import open_backend
    from hsmproxy.ops.audit import audit_mac

    backend = open_backend(spec)
    try:
        _, values = audit_mac(backend, {"key_id": key_id, "bodies": bodies})
    finally:
        backend.close()
    return str(values["macs"]).split()


def _verify_v1(args: argparse.Namespace, paths: list[str]) -> int:
    from hsmproxy.backend.errors import BackendError, DeviceError
    from hsmproxy.backend.offline import in_child
    from hsmproxy.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except (ConfigError, OSError) as exc:
        print(f"format-1 files need a node: config error: {exc}", file=sys.stderr)
        return 2
    nodes = [n for n in settings.nodes if not args.node or n.name == args.node]
    if not nodes:
        print("no such node in the config", file=sys.stderr)
        return 2

    def node_mac(bodies: list[str]) -> list[str]:
        last: Exception | None = None
        for spec in nodes:  # the first node that answers
            try:
                return in_child(_node_macs, spec, args.hmac_key_id, bodies)
            except (BackendError, DeviceError) as exc:
                last = exc
        raise SystemExit(f"no node could compute the format-1 MACs: {last}")

    try:
        report = verify_v1(list(paths), node_mac, live=args.live)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    _print_report(report, " (format 1, HMAC chain)")
    return 0 if report.ok else 1


def _prove(args: argparse.Namespace) -> int:
    try:
        proof = prove(list(args.paths), args.seq)
    except (ProofError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1
    text = json.dumps(proof, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="ascii")
    else:
        print(text)
    return 0


def _verify_proof(args: argparse.Namespace) -> int:
    try:
        pinned = _pinned(args.keys, args.config)
        proof = json.loads(Path(args.proof).read_text(encoding="ascii"))
    except (KeyFileError, OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    why = verify_proof(proof, pinned) if isinstance(proof, dict) else "not a proof document"
    if why:
        print(f"proof NOT valid: {why}")
        return 1
    cp = json.loads(proof["checkpoint"])
    print(
        f"proof valid: record {proof['seq']} is in checkpoint {cp['first']}..{cp['last']} "
        f"signed by {cp['signer'][:16]}… ({cp['node']}) at {cp['time']}"
    )
    return 0


def _node_key(spec: Any, key_id: str, generate: bool, replace: bool) -> tuple[bool, bytes]:
    """Child process: the node's signing public key, generated first when asked."""
    from hsmproxy.backend.errors import BackendError
    from hsmproxy.backend.offline import open_backend
    from hsmproxy.ops.audit import generate_signing_key, public_key_der

    backend = open_backend(spec)
    try:
        if generate:
            return generate_signing_key(backend, key_id, replace)
        try:
            return False, public_key_der(backend, key_id)
        except BackendError:
            return False, b""
    finally:
        backend.close()


def _keys(args: argparse.Namespace) -> int:
    from hsmproxy.backend.errors import DeviceError
    from hsmproxy.backend.offline import in_child
    from hsmproxy.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except (ConfigError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    key_id = settings.audit.key_id if settings.audit is not None else "00"
    nodes = [n for n in settings.nodes if not args.node or n.name == args.node]
    if not nodes:
        print("no such node in the config", file=sys.stderr)
        return 2
    entries: list[tuple[str, str, bytes]] = []
    missing = 0
    for spec in nodes:
        try:
            made, der = in_child(_node_key, spec, key_id, args.generate, args.replace)
        except DeviceError as exc:
            print(f"{spec.name}\tunavailable ({exc})")
            missing += 1
            continue
        if not der:
            print(f"{spec.name}\tkey {key_id}\tnone (run with --generate)")
            missing += 1
            continue
        print(f"{spec.name}\tkey {key_id}\t{fingerprint(der)}{'  (generated)' if made else ''}")
        entries.append((spec.name, key_id, der))
    if args.out and entries:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(pem_bundle(entries), encoding="ascii")
        print(f"wrote {len(entries)} public key(s) to {out}: pin this file ([audit] trusted_keys)")
    return 1 if missing else 0


def run_audit(args: argparse.Namespace) -> int:
    """Entry for ``hsmproxy audit ...``; returns the exit code."""
    verbs = {"verify": _verify, "prove": _prove, "verify-proof": _verify_proof, "keys": _keys}
    return verbs[args.audit_command](args)
