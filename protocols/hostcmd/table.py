"""The host-command table: every supported command's request and response layout, as data.

Layouts follow the payShield 9000/10K host command reference as reconstructed from public
implementations (see PROTOCOL.md). Field names are the ones command handlers use; names are
unique within a command. Request layouts end with the optional payShield tails the command
accepts (``%LL`` LMK identifier, ``#`` key-block attributes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from protocols.hostcmd.fields import (
    ALNUM,
    HEX,
    NUM,
    PRINT,
    Binary,
    ByKeyAlgorithm,
    Counted,
    Delimited,
    Der,
    Field,
    Fixed,
    Key,
    Literal,
    Opt,
    Present,
    When,
)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One host command: code, name and request/response layouts."""

    code: str
    name: str
    request: tuple[Field, ...]
    response: tuple[Field, ...]


def _one(*values: str) -> frozenset[str]:
    return frozenset(values)


# -- shared pieces -----------------------------------------------------------------------------

LMK_ID: Final = Opt(b"%", (Fixed("lmk_id", 2, NUM, error="13"),))

#: Key-block attributes after ``#`` (A0 with key type FFF and the key-block LMK).
KEY_BLOCK_ATTRIBUTES: Final = Opt(
    b"#",
    (
        Fixed("kb_usage", 2, ALNUM, error="A5"),
        Fixed("kb_algorithm", 2, ALNUM, error="A6"),
        Fixed("kb_mode_of_use", 1, ALNUM, error="A7"),
        Fixed("kb_version", 2, ALNUM, error="A8"),
        Fixed("kb_exportability", 1, ALNUM, error="A9"),
        Fixed("kb_optional_blocks", 2, NUM, error="AB"),
    ),
)

#: Key-block attributes after ``#`` when importing a variant key as a key block (A6): no algorithm.
IMPORT_KEY_BLOCK_ATTRIBUTES: Final = Opt(
    b"#",
    (
        Fixed("kb_usage", 2, ALNUM, error="A5"),
        Fixed("kb_mode_of_use", 1, ALNUM, error="A7"),
        Fixed("kb_version", 2, ALNUM, error="A8"),
        Fixed("kb_exportability", 1, ALNUM, error="A9"),
        Fixed("kb_optional_blocks", 2, NUM, error="AB"),
    ),
)

#: TR-31 export attributes after ``&`` (A0 mode 1 and A8 exporting as a key block).
KEY_BLOCK_EXPORT: Final = Opt(
    b"&",
    (Fixed("kb_export_exportability", 1, ALNUM, error="A9"),),
)


def _pin_block(name: str, key_field: str) -> ByKeyAlgorithm:
    """A PIN block: 16 hex under a TDES key, 32 hex under an AES key block."""
    return ByKeyAlgorithm(name, key_field, tdes_length=16, aes_length=32, error="20")


def _account(format_fields: str) -> When:
    """The account number: 12 digits, or for ISO format 4 (``48``) the full PAN, length-prefixed.

    payShield's 12-digit account field cannot carry the full PAN that ISO 9564-1 format 4 binds
    to, so when one of ``format_fields`` (``|``-separated) is ``48`` hsmproxy takes
    ``PAN length 2N + PAN`` in its place (README: "ISO format 4 account field").
    """
    return When(
        format_fields,
        _one("48"),
        (Fixed("pan_length", 2, NUM, error="15"), Counted("pan", "pan_length", base=10, error="15")),
    )


def _account12(format_fields: str) -> When:
    return When(format_fields, _one("48"), (Fixed("account", 12, NUM, error="15"),), negate=True)


def ACCOUNT_FOR(format_fields: str) -> tuple[When, When]:  # noqa: N802 - reads as a field kind
    """Account field for a command whose PIN block format(s) are ``format_fields``."""
    return (_account12(format_fields), _account(format_fields))


ACCOUNT: Final = Fixed("account", 12, NUM, error="15")
PIN_FORMAT_ERROR: Final = "23"
#: PIN under LMK: hsmproxy's own encoding, 16 hex (see README "PIN under LMK").
PIN_LMK_LENGTH: Final = 16
#: GM hash identifier -> digest length in bytes.
HASH_LENGTHS: Final[Mapping[str, int]] = {"01": 20, "05": 28, "06": 32, "07": 48, "08": 64}

#: M6 and M8 share their request up to the message: mode, formats, algorithm, key, [IV], message.
_MAC_REQUEST_HEAD: Final = (
    Fixed("mode", 1, NUM),
    Fixed("input_format", 1, NUM),
    Fixed("mac_size", 1, NUM),
    Fixed("mac_algorithm", 1, NUM),
    Fixed("padding", 1, NUM),
    Fixed("key_type", 3, ALNUM, error="04"),
    Key("key"),
    When("mode", _one("2", "3"), (ByKeyAlgorithm("iv", "key", 16, 32),)),
    Fixed("message_length", 4, HEX, error="80"),
    Counted("message", "message_length"),
)


def _verify_ibm(code: str, name: str, pin_key: str) -> CommandSpec:
    """DA (TPK) / EA (ZPK): verify a PIN block against an IBM 3624 offset."""
    return CommandSpec(
        code,
        name,
        (
            Key(pin_key),
            Key("pvk"),
            Fixed("max_pin_length", 2, NUM, error="24"),
            _pin_block("pin_block", pin_key),
            Fixed("format", 2, NUM, error=PIN_FORMAT_ERROR),
            Fixed("check_length", 2, NUM, error="15"),
            *ACCOUNT_FOR("format"),
            Fixed("decimalisation_table", 16, HEX, error="25"),
            Fixed("validation_data", 12, ALNUM),
            Fixed("offset", 12, ALNUM),
            LMK_ID,
        ),
        (),
    )


def _verify_pvv(code: str, name: str, pin_key: str) -> CommandSpec:
    """DC (TPK) / EC (ZPK): verify a PIN block against a Visa PVV."""
    return CommandSpec(
        code,
        name,
        (
            Key(pin_key),
            Key("pvk", untagged_length=32),
            _pin_block("pin_block", pin_key),
            Fixed("format", 2, NUM, error=PIN_FORMAT_ERROR),
            *ACCOUNT_FOR("format"),
            Fixed("pvki", 1, NUM),
            Fixed("pvv", 4, NUM),
            LMK_ID,
        ),
        (),
    )


# -- the table ---------------------------------------------------------------------------------

_SPECS: tuple[CommandSpec, ...] = (
    # Diagnostics and status
    CommandSpec(
        "NC", "Perform diagnostics", (LMK_ID,), (Fixed("lmk_check", 16, HEX), Fixed("firmware", 9, PRINT))
    ),
    CommandSpec(
        "NO",
        "HSM status",
        (Fixed("mode", 2, NUM),),
        (
            When(
                "mode",
                _one("00"),
                (
                    Fixed("io_buffer_size", 1, NUM),
                    Fixed("ethernet_type", 1, NUM),
                    Fixed("tcp_sockets", 2, NUM),
                    Fixed("firmware", 9, PRINT),
                    Fixed("reserved_1", 1, PRINT),
                    Fixed("reserved_2", 4, PRINT),
                ),
            ),
            When("mode", _one("01"), (Fixed("pci_compliance", 1, NUM), Fixed("reserved_3", 10, PRINT))),
        ),
    ),
    CommandSpec(
        "B2",
        "Echo",
        (Fixed("length", 4, HEX), Counted("data", "length")),
        (Counted("data", "length"),),
    ),
    # Keys
    CommandSpec(
        "A0",
        "Generate a key",
        (
            Fixed("mode", 1, ALNUM),
            Fixed("key_type", 3, ALNUM, error="04"),
            Fixed("key_scheme_lmk", 1, ALNUM, error="26"),
            When(
                "mode",
                _one("1"),
                (
                    Opt(b";", (Fixed("zmk_tmk_flag", 1, NUM),)),
                    Key("zmk"),
                    Fixed("key_scheme_zmk", 1, ALNUM, error="26"),
                ),
            ),
            LMK_ID,
            KEY_BLOCK_ATTRIBUTES,
            KEY_BLOCK_EXPORT,
        ),
        (
            Key("key_lmk"),
            When("mode", _one("1"), (Key("key_zmk"),)),
            Fixed("kcv", 6, HEX),
        ),
    ),
    CommandSpec(
        "A6",
        "Import a key",
        (
            Fixed("key_type", 3, ALNUM, error="04"),
            Key("zmk"),
            Key("key_zmk"),
            Fixed("key_scheme_lmk", 1, ALNUM, error="26"),
            LMK_ID,
            IMPORT_KEY_BLOCK_ATTRIBUTES,
        ),
        (Key("key_lmk"), Fixed("kcv", 6, HEX)),
    ),
    CommandSpec(
        "A8",
        "Export a key",
        (
            Fixed("key_type", 3, ALNUM, error="04"),
            Key("zmk"),
            Key("key_lmk"),
            Fixed("key_scheme_zmk", 1, ALNUM, error="26"),
            LMK_ID,
            KEY_BLOCK_EXPORT,
        ),
        (Key("key_zmk"), Fixed("kcv", 6, HEX)),
    ),
    CommandSpec(
        "BU",
        "Generate a key check value",
        (
            Fixed("key_type_code", 2, HEX, error="04"),
            Fixed("key_length_flag", 1, NUM, error="05"),
            Key("key"),
            When(
                "key_type_code",
                _one("FF"),
                (Literal(b";", error="04"), Fixed("key_type", 3, ALNUM, error="04")),
            ),
            Opt(b";", (Fixed("reserved", 2, NUM), Fixed("kcv_type", 1, NUM))),
            LMK_ID,
        ),
        (Delimited("kcv", 16, 6, b"", HEX),),
    ),
    CommandSpec(
        "FA",
        "Translate a ZPK from ZMK to LMK",
        (
            Key("zmk"),
            Key("zpk_zmk"),
            Opt(
                b";",
                (
                    Fixed("key_scheme_zmk", 1, ALNUM, error="26"),
                    Fixed("key_scheme_lmk", 1, ALNUM, error="26"),
                    Fixed("kcv_type", 1, NUM),
                ),
            ),
            LMK_ID,
        ),
        (Key("zpk_lmk"), Delimited("kcv", 16, 6, b"", HEX)),
    ),
    # PIN translation
    CommandSpec(
        "CA",
        "Translate a PIN from TPK to ZPK",
        (
            Key("tpk"),
            Key("zpk"),
            Fixed("max_pin_length", 2, NUM, error="24"),
            _pin_block("pin_block", "tpk"),
            Fixed("source_format", 2, NUM, error=PIN_FORMAT_ERROR),
            Fixed("destination_format", 2, NUM, error=PIN_FORMAT_ERROR),
            *ACCOUNT_FOR("source_format|destination_format"),
            LMK_ID,
        ),
        (Fixed("pin_length", 2, NUM), _pin_block("pin_block", "zpk"), Fixed("destination_format", 2, NUM)),
    ),
    CommandSpec(
        "CC",
        "Translate a PIN from ZPK to ZPK",
        (
            Key("source_zpk"),
            Key("destination_zpk"),
            Fixed("max_pin_length", 2, NUM, error="24"),
            _pin_block("pin_block", "source_zpk"),
            Fixed("source_format", 2, NUM, error=PIN_FORMAT_ERROR),
            Fixed("destination_format", 2, NUM, error=PIN_FORMAT_ERROR),
            *ACCOUNT_FOR("source_format|destination_format"),
            LMK_ID,
        ),
        (
            Fixed("pin_length", 2, NUM),
            _pin_block("pin_block", "destination_zpk"),
            Fixed("destination_format", 2, NUM),
        ),
    ),
    CommandSpec(
        "CI",
        "Translate a PIN from BDK to ZPK (DUKPT)",
        (
            Key("bdk"),
            Key("zpk"),
            Fixed("ksn_descriptor", 3, HEX),
            ByKeyAlgorithm("ksn", "bdk", tdes_length=20, aes_length=24),
            _pin_block("pin_block", "bdk"),
            Fixed("destination_format", 2, NUM, error=PIN_FORMAT_ERROR),
            *ACCOUNT_FOR("destination_format"),
            LMK_ID,
        ),
        (Fixed("pin_length", 2, NUM), _pin_block("pin_block", "zpk"), Fixed("destination_format", 2, NUM)),
    ),
    CommandSpec(
        "G0",
        "Translate a PIN from BDK to ZPK (3DES/AES DUKPT)",
        (
            Key("bdk"),
            Key("zpk"),
            Fixed("ksn_descriptor", 3, HEX),
            ByKeyAlgorithm("ksn", "bdk", tdes_length=20, aes_length=24),
            _pin_block("pin_block", "bdk"),
            Fixed("source_format", 2, NUM, error=PIN_FORMAT_ERROR),
            Fixed("destination_format", 2, NUM, error=PIN_FORMAT_ERROR),
            *ACCOUNT_FOR("source_format|destination_format"),
            LMK_ID,
        ),
        (Fixed("pin_length", 2, NUM), _pin_block("pin_block", "zpk"), Fixed("destination_format", 2, NUM)),
    ),
    # PIN under LMK
    CommandSpec(
        "JA",
        "Generate a random PIN",
        (ACCOUNT, Fixed("pin_length", 2, NUM, error="24"), LMK_ID),
        (Fixed("pin_lmk", PIN_LMK_LENGTH, HEX),),
    ),
    CommandSpec(
        "JC",
        "Translate a PIN from TPK to LMK",
        (
            Key("tpk"),
            _pin_block("pin_block", "tpk"),
            Fixed("format", 2, NUM, error=PIN_FORMAT_ERROR),
            *ACCOUNT_FOR("format"),
            LMK_ID,
        ),
        (Fixed("pin_lmk", PIN_LMK_LENGTH, HEX),),
    ),
    CommandSpec(
        "JE",
        "Translate a PIN from ZPK to LMK",
        (
            Key("zpk"),
            _pin_block("pin_block", "zpk"),
            Fixed("format", 2, NUM, error=PIN_FORMAT_ERROR),
            *ACCOUNT_FOR("format"),
            LMK_ID,
        ),
        (Fixed("pin_lmk", PIN_LMK_LENGTH, HEX),),
    ),
    CommandSpec(
        "JG",
        "Translate a PIN from LMK to ZPK",
        (
            Key("zpk"),
            Fixed("format", 2, NUM, error=PIN_FORMAT_ERROR),
            *ACCOUNT_FOR("format"),
            Fixed("pin_lmk", PIN_LMK_LENGTH, HEX, error="14"),
            LMK_ID,
        ),
        (_pin_block("pin_block", "zpk"),),
    ),
    # PIN verification (IBM 3624, Visa PVV)
    _verify_ibm("DA", "Verify a terminal PIN (IBM 3624)", "tpk"),
    _verify_ibm("EA", "Verify an interchange PIN (IBM 3624)", "zpk"),
    _verify_pvv("DC", "Verify a terminal PIN (Visa PVV)", "tpk"),
    _verify_pvv("EC", "Verify an interchange PIN (Visa PVV)", "zpk"),
    CommandSpec(
        "DE",
        "Generate an IBM PIN offset from a PIN under LMK",
        (
            Key("pvk"),
            Fixed("pin_lmk", PIN_LMK_LENGTH, HEX, error="14"),
            Fixed("check_length", 2, NUM),
            ACCOUNT,
            Fixed("decimalisation_table", 16, HEX, error="25"),
            Fixed("validation_data", 12, ALNUM),
            LMK_ID,
        ),
        (Fixed("offset", 12, ALNUM),),
    ),
    CommandSpec(
        "EE",
        "Derive a PIN from an IBM offset",
        (
            Key("pvk"),
            Fixed("offset", 12, ALNUM),
            Fixed("check_length", 2, NUM),
            ACCOUNT,
            Fixed("decimalisation_table", 16, HEX, error="25"),
            Fixed("validation_data", 12, ALNUM),
            LMK_ID,
        ),
        (Fixed("pin_lmk", PIN_LMK_LENGTH, HEX),),
    ),
    CommandSpec(
        "DG",
        "Generate a Visa PVV from a PIN under LMK",
        (
            Key("pvk", untagged_length=32),
            Fixed("pin_lmk", PIN_LMK_LENGTH, HEX, error="14"),
            ACCOUNT,
            Fixed("pvki", 1, NUM),
            LMK_ID,
        ),
        (Fixed("pvv", 4, NUM),),
    ),
    CommandSpec(
        "FW",
        "Generate a Visa PVV from a PIN block",
        (
            Fixed("key_type", 3, ALNUM, error="04"),
            Key("pin_key"),
            Key("pvk", untagged_length=32),
            _pin_block("pin_block", "pin_key"),
            Fixed("format", 2, NUM, error=PIN_FORMAT_ERROR),
            *ACCOUNT_FOR("format"),
            Fixed("pvki", 1, NUM),
            LMK_ID,
        ),
        (Fixed("pvv", 4, NUM),),
    ),
    # Card verification
    CommandSpec(
        "CW",
        "Generate a card verification value",
        (
            Key("cvk", untagged_length=32),
            Delimited("pan", 19, 1, b";", NUM),
            Literal(b";"),
            Fixed("expiry", 4, NUM),
            Fixed("service_code", 3, NUM),
            LMK_ID,
        ),
        (Fixed("cvv", 3, NUM),),
    ),
    CommandSpec(
        "CY",
        "Verify a card verification value",
        (
            Key("cvk", untagged_length=32),
            Fixed("cvv", 3, NUM),
            Delimited("pan", 19, 1, b";", NUM),
            Literal(b";"),
            Fixed("expiry", 4, NUM),
            Fixed("service_code", 3, NUM),
            LMK_ID,
        ),
        (),
    ),
    # Data encryption
    *(
        CommandSpec(
            code,
            name,
            (
                Fixed("mode", 2, NUM),
                Fixed("input_format", 1, NUM),
                Fixed("output_format", 1, NUM),
                Fixed("key_type", 3, ALNUM, error="04"),
                Key("key"),
                When(
                    "key_type",
                    _one("009", "609", "809"),
                    (Fixed("ksn_descriptor", 3, HEX), Fixed("ksn", 20, HEX)),
                ),
                When("mode", _one("01", "02", "03"), (ByKeyAlgorithm("iv", "key", 16, 32),)),
                Fixed("message_length", 4, HEX, error="80"),
                Counted("message", "message_length"),
                LMK_ID,
            ),
            (
                When("mode", _one("01", "02", "03"), (ByKeyAlgorithm("iv", "key", 16, 32),)),
                Fixed("message_length", 4, HEX),
                Counted("message", "message_length"),
            ),
        )
        for code, name in (("M0", "Encrypt data"), ("M2", "Decrypt data"))
    ),
    # MACs
    CommandSpec(
        "M6",
        "Generate a MAC",
        (
            *_MAC_REQUEST_HEAD,
            LMK_ID,
        ),
        (
            When("mode", _one("1", "2"), (ByKeyAlgorithm("iv", "key", 16, 32),)),
            When("mode", _one("0", "3"), (Delimited("mac", 32, 8, b"", HEX),)),
        ),
    ),
    CommandSpec(
        "M8",
        "Verify a MAC",
        (
            *_MAC_REQUEST_HEAD,
            When("mode", _one("0", "3"), (When("mac_size", _one("0"), (Fixed("mac", 8, HEX),)),)),
            When("mode", _one("0", "3"), (When("mac_size", _one("1"), (Fixed("mac", 16, HEX),)),)),
            LMK_ID,
        ),
        (When("mode", _one("1", "2"), (ByKeyAlgorithm("iv", "key", 16, 32),)),),
    ),
    CommandSpec(
        "MS",
        "Generate a MAC (X9.19) over a large message",
        (
            Fixed("block_number", 1, NUM),
            Fixed("key_type", 1, NUM, error="04"),
            Fixed("key_length", 1, NUM, error="05"),
            Fixed("message_type", 1, NUM),
            Key("key"),
            When("block_number", _one("2", "3"), (Fixed("iv", 16, HEX),)),
            Fixed("message_length", 4, HEX, error="80"),
            # MS counts bytes: a hex-encoded message (type 1) is twice as many characters.
            Counted("message", "message_length", scale_field="message_type", scale_values=_one("1")),
            LMK_ID,
        ),
        (Fixed("mab", 16, HEX),),
    ),
    # EMV
    CommandSpec(
        "KQ",
        "Verify an ARQC / generate an ARPC",
        (
            Fixed("mode", 1, NUM),
            Fixed("scheme_id", 1, NUM),
            Key("mk_ac"),
            Binary("pan_psn", 8),
            Binary("atc", 2),
            Binary("unpredictable_number", 4),
            When(
                "mode",
                _one("2"),
                (Fixed("data_length", 2, HEX, error="80"), Counted("data", "data_length"), Literal(b";")),
                negate=True,
            ),
            Binary("arqc", 8),
            When("mode", _one("1", "2"), (Binary("arc", 2),)),
            LMK_ID,
        ),
        (When("mode", _one("1", "2"), (Binary("arpc", 8),)),),
    ),
    # RSA
    CommandSpec(
        "EI",
        "Generate an RSA key pair",
        (
            Fixed("key_type_indicator", 1, NUM),
            Fixed("modulus_length", 4, NUM),
            Fixed("public_key_encoding", 2, NUM),
            Present(
                (
                    Fixed("exponent_length", 4, NUM),
                    Counted("exponent", "exponent_length", base=10, bits=True),
                ),
                stops=b"%#&",
            ),
            LMK_ID,
        ),
        (
            Binary("mac", 4),
            Der("public_key"),
            Fixed("private_key_length", 4, NUM),
            Counted("private_key", "private_key_length", base=10),
        ),
    ),
    CommandSpec(
        "EW",
        "Generate an RSA signature",
        (
            Fixed("hash_id", 2, NUM),
            Fixed("signature_id", 2, NUM),
            Fixed("pad_mode", 2, NUM),
            Fixed("message_length", 4, NUM, error="80"),
            Counted("message", "message_length", base=10),
            Literal(b";"),
            Fixed("private_key_flag", 2, NUM),
            Fixed("private_key_length", 4, NUM),
            Counted("private_key", "private_key_length", base=10),
            LMK_ID,
        ),
        (Fixed("signature_length", 4, NUM), Counted("signature", "signature_length", base=10)),
    ),
    CommandSpec(
        "EY",
        "Verify an RSA signature",
        (
            Fixed("hash_id", 2, NUM),
            Fixed("signature_id", 2, NUM),
            Fixed("pad_mode", 2, NUM),
            Fixed("signature_length", 4, NUM, error="80"),
            Counted("signature", "signature_length", base=10),
            Literal(b";"),
            Fixed("message_length", 4, NUM, error="80"),
            Counted("message", "message_length", base=10),
            Literal(b";"),
            Binary("mac", 4),
            Der("public_key"),
            LMK_ID,
        ),
        (),
    ),
    CommandSpec(
        "GM",
        "Hash a block of data",
        (
            Fixed("hash_id", 2, NUM),
            Fixed("data_length", 5, NUM, error="80"),
            Counted("data", "data_length", base=10),
        ),
        tuple(When("hash_id", _one(hid), (Binary("hash", n),)) for hid, n in HASH_LENGTHS.items()),
    ),
)

COMMANDS: Final[Mapping[str, CommandSpec]] = {spec.code: spec for spec in _SPECS}
