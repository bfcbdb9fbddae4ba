"""ISO 8583 gateway pieces without nodes: config parsing, specs, offsets, log-safe summaries, field 39."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import iso8583
import pytest

from hsmproxy.config import ConfigError, parse_settings
from hsmproxy.iso8583.codec import (
    SpecError,
    field_spans,
    icc_tags,
    load_spec,
    mac_start,
    mask_pan,
    pan_of,
    response_mti,
    summary,
)
from hsmproxy.iso8583.config import IsoConfigError, parse_iso8583
from hsmproxy.iso8583.gateway import pin_error_code

NODE = {"name": "n", "pin_env": "X"}
LISTENER = {"name": "iso", "protocol": "iso8583", "bind": "127.0.0.1:0"}
ROUTE = {"name": "r", "acquirer": "123456", "pin_in": "zpk-a", "pin_out": "zpk-b", "mac_in": "zak-a"}


def _data(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": [dict(LISTENER)],
        "iso8583": {"routes": [dict(ROUTE)]},
        "keystore": {},
    }
    data.update(extra)
    return data


def test_parse_listener_and_routes(tmp_path: Path) -> None:
    settings = parse_iso8583(_data(), tmp_path, ["default"])
    assert settings is not None
    (lc,) = settings.listeners
    assert (lc.mode, lc.framing, lc.spec_name, lc.tenant, lc.upstream) == (
        "service",
        "binary2",
        "ascii",
        "default",
        None,
    )
    (route,) = settings.routes_for(lc)
    assert route.match == (("32", "123456"),)
    assert (route.pin_in_format, route.pin_out_format, route.mac_in_algorithm, route.mac_failure_code) == (
        "01", "01", "3", "63",
    )  # fmt: skip
    assert route.matches({"32": "123456", "41": "T1"}) and not route.matches({"32": "654321"})
    assert settings.key_names() == {("default", "zpk-a"), ("default", "zpk-b"), ("default", "zak-a")}


def test_parse_settings_hooks_the_gateway_in(tmp_path: Path) -> None:
    data = _data(nodes=[NODE])
    data["listeners"].insert(0, {"name": "host", "bind": "127.0.0.1:0"})
    s = parse_settings(data, tmp_path)
    assert [lc.name for lc in s.listeners] == ["host"]
    assert s.iso8583 is not None and [lc.name for lc in s.iso8583.listeners] == ["iso"]
    assert parse_settings({"nodes": [NODE]}, tmp_path).iso8583 is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "inline"}, "upstream"),
        ({"mode": "relay"}, "mode"),
        ({"framing": "ascii2"}, "framing"),
        ({"spec": "ebcdic"}, "unknown spec"),
        ({"timeout": 0}, "timeout"),
        ({"colour": "red"}, "unknown keys"),
        ({"tenant": "nobody"}, "unknown tenant"),
    ],
)
def test_listener_errors(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    data = _data()
    data["listeners"][0].update(change)
    with pytest.raises(IsoConfigError, match=message):
        parse_iso8583(data, tmp_path, ["default"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pin_out": None}, "go together"),
        ({"mac_failure_code": "ABC"}, "mac_failure_code"),
        ({"mac_algorithm": "md5"}, "MAC"),
        ({"pin_out_format": "iso9"}, "pin_out_format"),
        ({"mac_padding": 3}, "mac_padding"),
        ({"listener": "other"}, "no iso8583 listener"),
    ],
)
def test_route_errors(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    data = _data()
    route = {k: v for k, v in {**ROUTE, **change}.items() if v is not None}
    data["iso8583"]["routes"] = [route]
    with pytest.raises(IsoConfigError, match=message):
        parse_iso8583(data, tmp_path, ["default"])


def test_routes_need_a_keystore(tmp_path: Path) -> None:
    data = _data(nodes=[NODE])
    del data["keystore"]
    with pytest.raises(ConfigError, match="keystore"):
        parse_settings(data, tmp_path)


def test_field_39_of_pin_errors() -> None:
    assert pin_error_code("24") == "55"
    assert {pin_error_code(c) for c in ("20", "10", "11", "22", "23", "27", "29", "69", "13")} == {"81"}


def test_response_mti_and_masking() -> None:
    assert [response_mti(m) for m in ("0200", "0100", "0420", "0800", "0210", "x")] == [
        "0210", "0110", "0430", "0810", "0210", "x",
    ]  # fmt: skip
    assert mask_pan("4012345678909") == "401234***8909"
    assert mask_pan("12345") == "*2345"
    assert pan_of({"35": ";4012345678909=2912101"}) == "4012345678909"


def test_summary_never_shows_secrets() -> None:
    fields = {
        "t": "0200", "2": "4012345678909", "11": "000001", "35": "4012345678909=2912",
        "45": "B4012345678909^X", "52": "0123456789ABCDEF", "55": "9F2608AABBCCDDEEFF0011", "41": "T1",
    }  # fmt: skip
    out = summary(fields)
    text = json.dumps(out)
    assert (
        out["pan"] == "401234***8909" and out["secret_fields"] == "35,45,52,55" and out["icc_tags"] == "9F26"
    )
    for secret in ("4012345678909", "0123456789ABCDEF", "AABBCCDDEEFF0011", "2912"):
        assert secret not in text
    assert icc_tags("9F26") == ["invalid"]


def test_specs_and_offsets(tmp_path: Path) -> None:
    doc = {"t": "0200", "2": "4012345678909", "11": "000001", "52": "0123456789ABCDEF",
           "53": "FFFF9876543210E00012", "64": "1122334455667788"}  # fmt: skip
    for name in ("ascii", "binary", "bcd"):
        spec = load_spec(name)
        raw, enc = iso8583.encode(dict(doc), spec)
        decoded, enc2 = iso8583.decode(bytes(raw), spec)
        assert {k: decoded[k] for k in doc} == doc
        spans = field_spans(enc2)
        assert spans["64"][1] == len(raw) and mac_start(enc2) == 0
        start, end = spans["52"]
        block = raw[start:end]
        assert block == (b"0123456789ABCDEF" if name == "ascii" else bytes.fromhex("0123456789ABCDEF"))
    overrides = tmp_path / "spec.json"
    overrides.write_text(json.dumps({"base": "binary", "fields": {"h": {"max_len": 4}}}))
    spec = load_spec("spec.json", tmp_path)
    raw, enc = iso8583.encode({"h": "HDR1", "t": "0800", "11": "000001"}, spec)
    assert bytes(raw).startswith(b"HDR10800") and mac_start(enc) == 4
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(SpecError):
        load_spec("bad.json", tmp_path)
    with pytest.raises(SpecError):
        load_spec("missing.toml", tmp_path)


def test_repo_config_iso_example_loads() -> None:
    path = Path(__file__).parents[2] / "config.toml"
    text = path.read_text()
    example = text[text.index("# -- example: an ISO 8583") : text.index("# -- example: a second tenant")]
    lines = [line[2:] for line in example.splitlines() if line.startswith("# ")]
    lines = [line for line in lines if not line.startswith(("--", "Create", "# "))]
    settings = parse_settings(tomllib.loads(text + "\n" + "\n".join(lines)), path.parent)
    assert settings.iso8583 is not None
    live, lc = settings.iso8583.listeners  # the dev listener, then the example
    assert (live.host, live.port, lc.port) == ("127.0.0.1", 8583, 8584)
    routes = {r.name: r for r in settings.iso8583.routes_for(lc)}
    route = routes["acquirer-a"]
    assert (lc.name, lc.mode, route.name, route.zmk, route.mac_in_algorithm) == (
        "iso-acq", "service", "acquirer-a", "zmk-acq", "3",
    )  # fmt: skip
    dev = {r.name: r for r in settings.iso8583.routes_for(live)}["dev"]
    assert (live.name, live.mode, dev.pin_in, dev.mac_out) == (
        "iso",
        "service",
        "bench-zpk-in",
        "bench-zak-out",
    )
