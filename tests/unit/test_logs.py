"""The redaction processor and the logging pipeline of hsmproxy.logs."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import structlog

from hsmproxy.logs import configure_logging, is_secret_name, mask_pan, redact, redact_text, remove_logging

KEY_HEX = "0123456789ABCDEFFEDCBA9876543210"


def test_mask_pan_keeps_six_and_four() -> None:
    assert mask_pan("4761739001010010") == "476173******0010"
    assert mask_pan("4761739001010") == "476173***1010"


def test_redact_text_masks_pans_hex_and_bytes_literals() -> None:
    text = f"card 4761739001010010 key {KEY_HEX} raw b'\\x01\\x02\\x03\\x04' pin 1234 id 42"
    out = redact_text(text)
    assert "4761739001010010" not in out and "476173******0010" in out
    assert KEY_HEX not in out and "<redacted hex 32>" in out
    assert "\\x01" not in out and "<redacted bytes>" in out
    assert "pin 1234 id 42" in out  # short numbers are not secrets by shape


def test_secret_names_versus_metadata() -> None:
    for name in ("pin", "pin_block", "zpk_key", "clear", "field_52", "track2", "password", "arqc"):
        assert is_secret_name(name), name
    for name in ("key_id", "pin_length", "key_type", "kcv", "tenant", "command", "node", "key_version"):
        assert not is_secret_name(name), name


def test_redact_processor_drops_values_and_recurses() -> None:
    event = {
        "event": f"translated {KEY_HEX}",
        "pin_block": "0412AC89ABCDEF67",
        "key_id": "zpk-a",
        "payload": {"clear_key": "x", "pan": "4761739001010010", "n": 3},
        "blob": b"\x00" * 16,
        "big": 4761739001010010,
    }
    out = redact(None, "info", dict(event))
    assert out["pin_block"] == "<redacted>"
    assert out["key_id"] == "zpk-a"
    assert out["payload"] == {"clear_key": "<redacted>", "pan": "476173******0010", "n": 3}
    assert out["blob"] == "<redacted 16 bytes>"
    assert out["big"] == "476173******0010"
    assert KEY_HEX not in out["event"]


def test_stdlib_and_structlog_lines_are_json_and_redacted() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    old = root.level
    handler = configure_logging("DEBUG", stream=stream, console=False)
    try:
        logging.getLogger("hsmproxy.test").warning("key %s for 4761739001010010", KEY_HEX)
        structlog.get_logger("hsmproxy.test").info("translated", pin_block="0412AC89ABCDEF67", tenant="t1")
    finally:
        remove_logging(handler)
        root.setLevel(old)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[0]["level"] == "warning" and lines[0]["logger"] == "hsmproxy.test"
    assert KEY_HEX not in lines[0]["event"] and "476173******0010" in lines[0]["event"]
    assert lines[1]["event"] == "translated" and lines[1]["pin_block"] == "<redacted>"
    assert lines[1]["tenant"] == "t1" and "timestamp" in lines[1]
    assert "0412AC89ABCDEF67" not in stream.getvalue()


def test_default_stream_is_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a stream the handler writes to whatever sys.stderr is at emit time, never a closed one."""
    root = logging.getLogger()
    old = root.level
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    handler = configure_logging("INFO", console=False)
    try:
        first.close()  # what pytest does to a test's captured stderr once the test ends
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("hsmproxy.test").info("after the swap")
    finally:
        remove_logging(handler)
        root.setLevel(old)
    assert json.loads(second.getvalue())["event"] == "after the swap"
