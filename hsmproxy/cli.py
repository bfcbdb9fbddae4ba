"""The ``hsmproxy`` command line: ``emulator``, ``conformance`` (more subcommands land with the proxy)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hsmproxy.configutil import split_host_port


def _host_port(text: str) -> tuple[str, int]:
    found = split_host_port(text, default_host="")
    if found is None:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return found


def _header_length(text: str) -> int:
    n = int(text)
    if not 0 <= n <= 255:
        raise argparse.ArgumentTypeError("header length must be 0..255")
    return n


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="hsmproxy", description="payShield-compatible HSM proxy")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="subcommand", required=True)

    emu = sub.add_parser("emulator", help="run the reference software HSM")
    emu.add_argument("--listen", type=_host_port, default=("127.0.0.1", 1501), metavar="HOST:PORT")
    emu.add_argument("--header-length", type=_header_length, default=4)
    emu.add_argument(
        "--lmk-file",
        action="append",
        default=[],
        metavar="PATH",
        help="extra LMKs from a component file (repeatable)",
    )

    srv = sub.add_parser("serve", help="run the proxy")
    srv.add_argument("--config", default="config.toml", metavar="PATH")

    chk = sub.add_parser("check", help="validate a config file")
    chk.add_argument("--config", default="config.toml", metavar="PATH")

    con = sub.add_parser("console", help="admin console client (or: console passwd → a password hash)")
    con.add_argument(
        "action", nargs="?", choices=("connect", "passwd"), default="connect",
        help="connect (default) or passwd: print the scrypt hash of a password (stdin or prompt)",
    )  # fmt: skip
    con.add_argument("--host", default="127.0.0.1")
    con.add_argument("--port", type=int, default=9998)
    con.add_argument("--user", default="", help="log in first (HSMPROXY_CONSOLE_PASSWORD or a prompt)")

    lmk = sub.add_parser("lmk", help="LMK ceremony: load and list LMKs on nodes")
    lmk_sub = lmk.add_subparsers(dest="lmk_command", required=True)
    load = lmk_sub.add_parser("load", help="create an LMK's objects on node tokens")
    load.add_argument("--config", default="config.toml", metavar="PATH")
    target = load.add_mutually_exclusive_group(required=True)
    target.add_argument("--node", metavar="NAME")
    target.add_argument("--all", action="store_true")
    load.add_argument(
        "--id", dest="lmk_id", metavar="NN", help="LMK id (with --components; --test loads 00 and 01)"
    )
    how = load.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--test", action="store_true", help="the public test LMKs (id 00 variant, id 01 AES key block)"
    )
    how.add_argument(
        "--components", type=int, metavar="N", help="type N components of a variant LMK at a hidden prompt"
    )
    how.add_argument(
        "--audit-components", type=int, metavar="N",
        help="type N components (32 bytes each) of the audit HMAC key at a hidden prompt",
    )  # fmt: skip
    load.add_argument("--audit-id", default="00", metavar="NN", help="audit key id (default 00)")
    lst = lmk_sub.add_parser("list", help="LMK ids, schemes and check values per node")
    lst.add_argument("--config", default="config.toml", metavar="PATH")

    bench = sub.add_parser("bench", help="load generator (or --echo-server: the raw echo responder)")
    bench.add_argument("--target", type=_host_port, metavar="HOST:PORT")
    bench.add_argument(
        "--echo-server", type=_host_port, metavar="HOST:PORT", help="serve the raw echo responder"
    )
    bench.add_argument("--command", default="CC")
    bench.add_argument("--connections", type=int, default=8)
    bench.add_argument("--depth", type=int, default=1, help="requests in flight per connection (closed loop)")
    bench.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds measured (after the warm-up)")
    bench.add_argument("--warmup", type=float, default=1.0, help="seconds sent before the measured window")
    bench.add_argument(
        "--grace", type=float, default=2.0,
        help="seconds to wait for answers after the last request; later ones count as unanswered",
    )  # fmt: skip
    bench.add_argument(
        "--processes", type=_positive_int, default=1, metavar="N",
        help="N client processes sharing the connections and the rate; results merged exactly",
    )  # fmt: skip
    bench.add_argument("--timeline", action="store_true", help="per-second buckets in the result")
    bench.add_argument(
        "--then-rate", type=float, default=0.0, metavar="R2",
        help="open loop: go on at R2 requests per second right after the main phase",
    )  # fmt: skip
    bench.add_argument(
        "--then-duration", type=float, default=0.0, metavar="S2", help="seconds at --then-rate"
    )
    bench.add_argument(
        "--recovery-p99-ms", type=float, default=10.0, metavar="MS",
        help="recovery_s: first second of the --then-rate phase with p99 under this (default 10)",
    )  # fmt: skip
    bench.add_argument(
        "--keys", choices=("hot", "cold"), default="hot", help="CC: one key pair, or one per request"
    )
    bench.add_argument("--header-length", type=_header_length, default=4)
    bench.add_argument("--idle", type=int, default=0, help="extra idle connections held open during the run")
    bench.add_argument("--json", action="store_true")

    conf = sub.add_parser("conformance", help="differential run: target against reference")
    conf.add_argument("--reference", type=_host_port, required=True, metavar="HOST:PORT")
    conf.add_argument("--target", type=_host_port, required=True, metavar="HOST:PORT")
    conf.add_argument("--header-length", type=_header_length, default=4)
    conf.add_argument("--cases", default=None, metavar="DIR", help="case files (default: bundled corpus)")
    conf.add_argument("--random", type=int, default=0, metavar="N", help="N random requests per command")
    conf.add_argument("--seed", type=int, default=1)
    conf.add_argument("--commands", default="", help="comma-separated subset of commands")
    conf.add_argument("--json", action="store_true", help="print the summary as JSON")

    from hsmproxy.audit.cli import add_audit_parser

    add_audit_parser(sub)
    from hsmproxy.keys.cli import add_keys_parser

    add_keys_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hsmproxy`` console script."""
    args = build_parser().parse_args(argv)
    from hsmproxy.logs import configure_logging

    configure_logging(args.log_level)
    if args.subcommand == "emulator":
        from emulator.app import run_emulator

        host, port = args.listen
        return run_emulator(host, port, args.header_length, args.lmk_file)
    if args.subcommand == "serve":
        from hsmproxy.server.run import run_serve

        return run_serve(args.config)
    if args.subcommand == "check":
        from hsmproxy.config import ConfigError, load_settings

        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 1
        except (ValueError, TypeError) as exc:  # a value of the wrong type the parser did not word
            print(f"config error: {args.config}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(
            f"{args.config}: ok ({len(settings.listeners)} host-command and "
            f"{len(settings.iso8583.listeners) if settings.iso8583 is not None else 0} ISO 8583 listeners, "
            f"{len(settings.nodes)} nodes, "
            f"{len(settings.tenants)} tenants, {len(settings.console_users)} console users)"
        )
        return 0
    if args.subcommand == "console":
        if args.action == "passwd":
            from hsmproxy.server.console import run_passwd

            return run_passwd()
        from hsmproxy.console_client import run_console

        return run_console(args.host, args.port, args.user)
    if args.subcommand == "lmk":
        from hsmproxy.keys.ceremony import run_lmk

        return run_lmk(args)
    if args.subcommand == "audit":
        from hsmproxy.audit.cli import run_audit

        return run_audit(args)
    if args.subcommand == "bench":
        return _bench(args)
    if args.subcommand == "keys":
        from hsmproxy.keys.cli import run_keys

        return run_keys(args)
    if args.subcommand == "conformance":
        from conformance.runner import run_conformance

        return run_conformance(
            reference=args.reference,
            target=args.target,
            header_length=args.header_length,
            cases_dir=args.cases,
            random_count=args.random,
            seed=args.seed,
            commands=[c for c in args.commands.split(",") if c],
            as_json=args.json,
        )
    return 2


def _bench(args: argparse.Namespace) -> int:
    import asyncio

    import uvloop

    from hsmproxy.bench import check_options, echo_server, format_result, run_bench

    if args.echo_server:
        host, port = args.echo_server
        try:
            uvloop.run(echo_server(host, port, args.header_length))
        except KeyboardInterrupt:
            pass
        return 0
    if not args.target:
        print("bench: --target HOST:PORT is required", file=sys.stderr)
        return 2
    host, port = args.target
    try:
        check_options(
            args.command, args.connections, args.processes, args.rate, args.then_rate, args.then_duration,
            args.idle,
        )  # fmt: skip
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    result = uvloop.run(
        run_bench(
            host,
            port,
            args.command,
            args.connections,
            args.depth,
            args.rate,
            args.duration,
            args.header_length,
            args.keys,
            warmup=args.warmup,
            idle=args.idle,
            processes=args.processes,
            then_rate=args.then_rate,
            then_duration=args.then_duration,
            grace=args.grace,
            timeline=args.timeline,
            recovery_p99_ms=args.recovery_p99_ms,
        )
    )
    print(format_result(result, args.json))
    del asyncio
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
