"""What the emulated HSM holds: its LMKs and its security settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from emulator.crypto.keyblock import KeyBlockLmk
from emulator.crypto.lmk import VariantLmk

#: Firmware number reported by NC and NO (9 characters, payShield style).
FIRMWARE = "1000-E000"


@dataclass(slots=True)
class EmulatorState:
    """LMKs by id (``"00"``, ``"01"`` …), header length and enabled commands / PIN formats."""

    variant_lmks: dict[str, VariantLmk]
    keyblock_lmks: dict[str, KeyBlockLmk]
    header_length: int = 4
    default_lmk_id: str = "00"
    disabled_commands: set[str] = field(default_factory=set)
    disabled_pin_formats: set[str] = field(default_factory=set)
    firmware: str = FIRMWARE

    def lmk_ids(self) -> list[str]:
        """Every loaded LMK id, sorted."""
        return sorted({*self.variant_lmks, *self.keyblock_lmks})
