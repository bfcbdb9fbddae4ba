"""Emulator command family: card (handlers land here)."""

from __future__ import annotations

from emulator.hsm import Handler

HANDLERS: dict[str, Handler] = {}
