"""The differential conformance runner: a target HSM (or proxy) against a reference.

``run_conformance`` connects to both endpoints, then

1. runs the fixed cases (``conformance/cases/*.toml`` or ``cases_dir``): each request goes to both
   sides; a case with an exact ``expect`` passes when the *target* answers exactly that, a case
   with ``expect = "reference"`` when the target answers what the reference answers;
2. sends ``random_count`` random requests per command (:mod:`conformance.generators`, seeded by
   ``seed``) to both sides and compares them byte for byte, or with the generator's round-trip
   check for commands whose output is random (A0, JA, EI, translations into ISO-1/ISO-3).

Each request lands in one column of the per-command table:

* ``same`` - the comparison holds;
* ``different`` - it does not (response code, error code, bytes or round trip);
* ``unsupported`` - both sides answer ``68`` (command disabled / not implemented on either), which
  compares equal but is not evidence of conformance;
* ``errors`` - no usable response (timeout, closed connection).

The details of the first differences name the case (or the seed and index of the random request,
enough to regenerate it with :func:`conformance.generators.generate`), request and response lengths
and response/error codes, never a key, PIN or PAN. The exit code is 1 when anything differs or
fails, else 0.

Case files (TOML)::

    [[case]]
    name = "cw-visa-cvv-561"
    command = 'CWU1234...4123456789012345;8701101'   # the request after the header
    expect = "CX00561"                              # or "reference"

``command``/``expect`` are text in which ``\\xNN`` stands for the byte NN and ``\\\\`` for a
backslash (write them in TOML literal strings, single-quoted, so TOML leaves the backslashes
alone); ``request_hex``/``expect_hex`` give binary requests/responses as hex instead.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from conformance.client import ClientError, HostClient
from conformance.generators import (
    GENERATORS,
    GenContext,
    Generated,
    RsaMaterial,
    decode_public_key,
    generate,
    parse_response,
    public_key_mac,
    request_count,
)
from emulator.crypto import rsa as ersa
from emulator.crypto.errors import CryptoError
from protocols.hostcmd.fields import ParseError
from protocols.hostcmd.table import COMMANDS

#: The bundled case corpus.
BUNDLED_CASES = Path(__file__).resolve().parent / "cases"
#: Difference details printed (all are in the JSON summary up to this many as well).
MAX_DETAILS = 10
#: Random requests generated and sent per batch.
BATCH = 500

SAME, DIFFERENT, UNSUPPORTED, ERROR = "same", "different", "unsupported", "errors"


# -- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """A fixed case: request (code + data) and the exact expected response, or None = reference."""

    name: str
    request: bytes
    expect: bytes | None
    source: str = ""

    @property
    def command(self) -> str:
        """The 2-character command code."""
        return self.request[:2].decode("latin-1")


_ESCAPE = re.compile(rb"\\(x[0-9A-Fa-f]{2}|\\)")


def decode_escapes(text: str) -> bytes:
    """Case text to bytes: ``\\xNN`` is byte NN, ``\\\\`` a backslash, other characters latin-1."""
    raw = text.encode("latin-1")
    return _ESCAPE.sub(
        lambda m: b"\\" if m.group(1) == b"\\" else bytes.fromhex(m.group(1)[1:].decode()), raw
    )


def load_cases(directory: str | Path | None = None) -> list[Case]:
    """Every case of the ``*.toml`` files in ``directory`` (default: the bundled corpus), sorted by file.

    Raises:
        ValueError: a case lacks a name, a request or an expectation.
    """
    root = Path(directory) if directory is not None else BUNDLED_CASES
    cases: list[Case] = []
    for path in sorted(root.glob("*.toml")):
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        for i, entry in enumerate(data.get("case", [])):
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{path.name}: case {i} has no name")
            if "request_hex" in entry:
                request = bytes.fromhex(entry["request_hex"])
            elif "command" in entry:
                request = decode_escapes(entry["command"])
            else:
                raise ValueError(f"{path.name}: case {name} has neither command nor request_hex")
            expect: bytes | None
            if "expect_hex" in entry:
                expect = bytes.fromhex(entry["expect_hex"])
            elif entry.get("expect") == "reference":
                expect = None
            elif isinstance(entry.get("expect"), str):
                expect = decode_escapes(entry["expect"])
            else:
                raise ValueError(f"{path.name}: case {name} has no expect")
            cases.append(Case(name, request, expect, path.name))
    return cases


# -- comparison ----------------------------------------------------------------------------------


@dataclass(slots=True)
class CommandStats:
    """One row of the summary table."""

    sent: int = 0
    same: int = 0
    different: int = 0
    unsupported: int = 0
    errors: int = 0


@dataclass(slots=True)
class Difference:
    """What is printed about one difference: enough to reproduce it, no secrets."""

    command: str
    origin: str
    compare: str
    reason: str
    request_length: int
    reference: str
    target: str


@dataclass(slots=True)
class Summary:
    """The result of a run."""

    commands: dict[str, CommandStats] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    difference_count: int = 0
    seconds: float = 0.0

    def record(self, command: str, outcome: str, diff: Difference | None = None) -> None:
        """Count one request's outcome (and keep the first differences' details)."""
        stats = self.commands.setdefault(command, CommandStats())
        stats.sent += 1
        setattr(stats, outcome, getattr(stats, outcome) + 1)
        if diff is not None:
            self.difference_count += 1
            if len(self.differences) < MAX_DETAILS:
                self.differences.append(diff)

    @property
    def failed(self) -> bool:
        """True when any request differed or failed."""
        return any(s.different or s.errors for s in self.commands.values())


def _describe(resp: bytes | ClientError) -> str:
    if isinstance(resp, ClientError):
        return f"error: {resp}"
    return f"{resp[:4].decode('latin-1', 'replace')} ({len(resp)} bytes)"


def _unsupported(resp: bytes | ClientError) -> bool:
    return isinstance(resp, bytes) and resp[2:4] == b"68" and (len(resp) == 4 or resp[4] == 0x19)


class _Oracle:
    def __init__(self, client: HostClient) -> None:
        self._client = client

    async def reference(self, request: bytes) -> bytes:
        return await self._client.call(request)


async def classify(
    ref: bytes | ClientError,
    tgt: bytes | ClientError,
    *,
    expect: bytes | None = None,
    generated: Generated | None = None,
    oracle: _Oracle | None = None,
) -> tuple[str, str]:
    """Outcome (same/different/unsupported/errors) and reason of one request."""
    if isinstance(tgt, ClientError):
        return ERROR, "target gave no response"
    if expect is not None:
        if tgt == expect:
            return SAME, ""
        if _unsupported(tgt) and _unsupported(ref):
            return UNSUPPORTED, ""
        return DIFFERENT, "target response differs from the expected response"
    if isinstance(ref, ClientError):
        return ERROR, "reference gave no response"
    if _unsupported(ref) and _unsupported(tgt):
        return UNSUPPORTED, ""
    if ref[:4] != tgt[:4]:
        return DIFFERENT, "response or error code differs"
    check = generated.check if generated is not None else None
    if check is None or generated is None or ref[2:4] != b"00":
        return (SAME, "") if ref == tgt else (DIFFERENT, "response bytes differ")
    try:
        ref_values = parse_response(generated.command, ref, generated.values)
    except ParseError:
        return DIFFERENT, "reference response does not parse"
    try:
        tgt_values = parse_response(generated.command, tgt, generated.values)
    except ParseError:
        return DIFFERENT, "target response does not parse"
    assert oracle is not None
    try:
        reason = await check.fn(ref_values, tgt_values, oracle)
    except ClientError:
        return ERROR, "reference gave no response to the round-trip request"
    return (SAME, "") if reason is None else (DIFFERENT, reason)


# -- the run -------------------------------------------------------------------------------------


async def _both(
    ref: HostClient, tgt: HostClient, requests: Sequence[bytes]
) -> tuple[list[bytes | ClientError], list[bytes | ClientError]]:
    r, t = await asyncio.gather(ref.call_many(requests), tgt.call_many(requests))
    return r, t


async def _rsa_from_reference(ref: HostClient, ctx: GenContext) -> None:
    """Take the run's RSA key pair from one EI on the reference (else generators make one locally)."""
    try:
        resp = await ref.call(b"EI2102402")
    except ClientError:
        return
    if resp[2:4] != b"00":
        return
    try:
        values = parse_response("EI", resp, {"key_type_indicator": "2"})
        blob, der, mac = values["private_key"], values["public_key"], values.get("mac", b"")
        assert isinstance(blob, bytes) and isinstance(der, bytes) and isinstance(mac, bytes)
        key = ersa.decrypt_private_key_under_lmk(ctx.lmk, blob)
        public = decode_public_key(der)
    except (ParseError, CryptoError, AssertionError, ValueError, IndexError):
        return
    if key.public_key().public_numbers() == public.public_numbers():
        ctx.rsa = RsaMaterial(key, blob, der, mac or public_key_mac(ctx.lmk, der))


async def run_async(
    reference: tuple[str, int],
    target: tuple[str, int],
    header_length: int = 4,
    cases_dir: str | Path | None = None,
    random_count: int = 0,
    seed: int = 1,
    commands: Sequence[str] = (),
    *,
    timeout: float = 10.0,
    run_cases: bool = True,
) -> Summary:
    """Run the cases and random requests; return the summary (see module docstring).

    Raises:
        ClientError / OSError: an endpoint cannot be reached at all.
        ValueError: an unknown command in ``commands`` or a malformed case file.
    """
    wanted = [c.upper() for c in commands]
    unknown = [c for c in wanted if c not in COMMANDS]
    if unknown:
        raise ValueError(f"unknown command(s): {', '.join(unknown)}")
    started = time.perf_counter()
    summary = Summary()
    ref = HostClient(*reference, header_length, timeout=timeout)
    tgt = HostClient(*target, header_length, timeout=timeout)
    try:
        await ref.connect()
        await tgt.connect()
        oracle = _Oracle(ref)
        if run_cases:
            cases = [c for c in load_cases(cases_dir) if not wanted or c.command in wanted]
            for start in range(0, len(cases), BATCH):
                chunk = cases[start : start + BATCH]
                refs, tgts = await _both(ref, tgt, [c.request for c in chunk])
                for case, r, t in zip(chunk, refs, tgts, strict=True):
                    outcome, reason = await classify(r, t, expect=case.expect)
                    diff = None
                    if outcome in (DIFFERENT, ERROR):
                        diff = Difference(
                            case.command,
                            f"case {case.name} ({case.source})",
                            "exact" if case.expect is not None else "bytes",
                            reason,
                            len(case.request),
                            _describe(r),
                            _describe(t),
                        )
                    summary.record(case.command, outcome, diff)
        if random_count > 0:
            ctx = GenContext()
            selected = wanted or list(GENERATORS)
            if {"EW", "EY"} & set(selected):
                await _rsa_from_reference(ref, ctx)
            for command in selected:
                summary.commands.setdefault(command, CommandStats())
                total = request_count(command, random_count)
                for start in range(0, total, BATCH):
                    indices = range(start, min(total, start + BATCH))
                    gens = [generate(command, seed, i, ctx) for i in indices]
                    refs, tgts = await _both(ref, tgt, [g.request for g in gens])
                    for i, g, r, t in zip(indices, gens, refs, tgts, strict=True):
                        outcome, reason = await classify(r, t, generated=g, oracle=oracle)
                        diff = None
                        if outcome in (DIFFERENT, ERROR):
                            diff = Difference(
                                command,
                                f"random seed {seed} index {i}",
                                g.compare,
                                reason,
                                len(g.request),
                                _describe(r),
                                _describe(t),
                            )
                        summary.record(command, outcome, diff)
    finally:
        await ref.close()
        await tgt.close()
    summary.seconds = time.perf_counter() - started
    return summary


def format_table(summary: Summary) -> str:
    """The per-command table and the first differences, as text."""
    lines = [f"{'command':<8}{'sent':>8}{'same':>8}{'different':>11}{'unsupported':>13}{'errors':>8}"]
    total = CommandStats()
    for command in sorted(summary.commands):
        s = summary.commands[command]
        lines.append(f"{command:<8}{s.sent:>8}{s.same:>8}{s.different:>11}{s.unsupported:>13}{s.errors:>8}")
        for name in ("sent", "same", "different", "unsupported", "errors"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
    lines.append(
        f"{'total':<8}{total.sent:>8}{total.same:>8}{total.different:>11}{total.unsupported:>13}{total.errors:>8}"
    )
    if summary.differences:
        lines.append("")
        shown = len(summary.differences)
        lines.append(f"first {shown} of {summary.difference_count} differences/errors:")
        for d in summary.differences:
            lines.append(
                f"  {d.command} {d.origin} [{d.compare}]: {d.reason}; request {d.request_length} bytes; "
                f"reference {d.reference}; target {d.target}"
            )
    lines.append("")
    lines.append(f"{'FAIL' if summary.failed else 'PASS'} in {summary.seconds:.1f} s")
    return "\n".join(lines)


def summary_json(summary: Summary) -> str:
    """The summary as JSON."""
    return json.dumps(
        {
            "result": "fail" if summary.failed else "pass",
            "seconds": round(summary.seconds, 3),
            "commands": {c: asdict(s) for c, s in sorted(summary.commands.items())},
            "difference_count": summary.difference_count,
            "differences": [asdict(d) for d in summary.differences],
        },
        indent=2,
    )


def run_conformance(
    reference: tuple[str, int],
    target: tuple[str, int],
    header_length: int = 4,
    cases_dir: str | Path | None = None,
    random_count: int = 0,
    seed: int = 1,
    commands: Sequence[str] = (),
    as_json: bool = False,
    *,
    out: TextIO | None = None,
) -> int:
    """Run a conformance comparison, print the summary; return 0 when all agrees, 1 otherwise.

    An unreachable endpoint, an unknown command or a malformed case file prints an error and
    returns 2.
    """
    stream = out if out is not None else sys.stdout
    try:
        summary = asyncio.run(
            run_async(reference, target, header_length, cases_dir, random_count, seed, commands)
        )
    except (OSError, ClientError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    print(summary_json(summary) if as_json else format_table(summary), file=stream)
    return 1 if summary.failed else 0
