"""Emulator command family: pin (handlers land here)."""

from __future__ import annotations

from emulator.hsm import Handler

HANDLERS: dict[str, Handler] = {}
