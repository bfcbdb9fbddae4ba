"""``hsmproxy lmk load|list``: run the LMK ceremony against the configured nodes' tokens.

The ceremony opens each node's token directly, one node at a time, each in a child process of
its own: a PKCS#11 library reads its configuration (e.g. SOFTHSM2_CONF) once per process, so
two nodes with different module settings cannot share one. Components are read here, in the
parent, and handed to the child over a pipe; only check values are printed.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from hsmproxy.backend.errors import BackendError, DeviceError
from hsmproxy.backend.offline import in_child, open_backend
from hsmproxy.backend.spec import NodeSpec
from hsmproxy.config import ConfigError, load_settings
from hsmproxy.keys.lmk import (
    TEST_AUDIT_KEY,
    TEST_AUDIT_KEY_ID,
    audit_key_check_value,
    load_audit_key,
    load_keyblock_lmk,
    load_variant_lmk,
    prompt_components,
    test_lmks,
)


def _list_node(spec: NodeSpec) -> list[str]:
    try:
        backend = open_backend(spec)
    except DeviceError as exc:
        return [f"{spec.name}\tunavailable ({exc})"]
    ids: dict[str, set[str]] = {}
    for label in backend.lmk_labels():
        parts = label.split(":")
        scheme = "variant" if parts[0] == "hsmproxy-lmk" else "keyblock"
        ids.setdefault(parts[1], set()).add(scheme)
    lines = []
    for lmk_id, schemes in sorted(ids.items()):
        check = ""
        if "variant" in schemes:
            obj = backend.lmk_object(f"hsmproxy-lmk:{lmk_id}:00:0:-")
            check = backend.ecb_encrypt(obj, bytes(8)).hex().upper()
        else:
            try:
                obj = backend.lmk_object(f"hsmproxy-kblmk:{lmk_id}:lmk")
                check = backend.aes_cmac(obj, bytes(16))[:8].hex().upper()
            except BackendError:
                check = "(reload: no check object)"
        lines.append(f"{spec.name}\t{lmk_id}\t{'/'.join(sorted(schemes))}\t{check}")
    backend.close()
    return lines


def load_node(spec: NodeSpec, lmks: dict[str, tuple[str, list[bytes]]]) -> list[str]:
    """Load ``lmks`` (id -> (scheme, values)) on one node's token; one line per LMK loaded (check
    values only). Runs in a child process (:func:`~hsmproxy.backend.offline.in_child`)."""
    try:
        backend = open_backend(spec)
    except DeviceError as exc:
        raise SystemExit(f"{spec.name}: cannot open token: {exc}") from None
    lines = []
    for lmk_id, (scheme, values) in lmks.items():
        if scheme == "variant":
            result = load_variant_lmk(backend, spec.name, lmk_id, values)
        elif scheme == "audit":  # the audit HMAC key (hsmproxy/audit.py), keyed "audit:<id>"
            result = load_audit_key(backend, spec.name, lmk_id.split(":", 1)[1], values[0])
        else:
            result = load_keyblock_lmk(backend, spec.name, lmk_id, values[0])
        lines.append(
            f"{result.node}: LMK {result.lmk_id} ({result.scheme}) loaded, "
            f"{result.objects} objects, check value {result.check_value}"
        )
    backend.close()
    return lines


def run_lmk(args: argparse.Namespace) -> int:
    """Entry for the ``lmk`` subcommands; returns the exit code."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    if args.lmk_command == "list":
        for spec in settings.nodes:
            for line in in_child(_list_node, spec):
                print(line)
        return 0
    nodes = [n for n in settings.nodes if args.all or n.name == args.node]
    if not nodes:
        print(f"no node named {args.node!r} in {args.config}", file=sys.stderr)
        return 1
    if args.test:
        lmks = test_lmks()
        lmks[f"audit:{TEST_AUDIT_KEY_ID}"] = ("audit", [TEST_AUDIT_KEY])
    elif getattr(args, "audit_components", None):
        # The audit HMAC key (hsmproxy/audit.py) as an LMK is made: XOR of N components typed by
        # N custodians; each component's and the key's check value are printed, never a value.
        key_id = str(args.audit_id)
        if not 1 <= len(key_id) <= 8 or not key_id.isalnum():
            print("--audit-id must be 1..8 letters or digits", file=sys.stderr)
            return 1
        if args.audit_components < 2:
            print("--audit-components needs at least 2 components (dual control)", file=sys.stderr)
            return 1
        try:
            value = prompt_components(
                args.audit_components, 32, ask=getpass.getpass, check=audit_key_check_value
            )
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"audit key {key_id} check value: {audit_key_check_value(value)}")
        lmks = {f"audit:{key_id}": ("audit", [value])}
    else:
        if not args.lmk_id or len(args.lmk_id) != 2 or not args.lmk_id.isdigit():
            print("--id NN is required with --components", file=sys.stderr)
            return 1
        print("enter each of the 20 LMK pairs as components", file=sys.stderr)
        values = []
        for i in range(20):
            print(f"pair {2 * i:02d}-{2 * i + 1:02d}")
            values.append(prompt_components(args.components, 16))
        lmks = {args.lmk_id: ("variant", values)}
    for spec in nodes:
        try:
            lines = in_child(load_node, spec, lmks)
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            return 1
        for line in lines:
            print(line)
    return 0
