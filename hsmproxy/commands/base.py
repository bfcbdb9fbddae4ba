"""What a front-side command handler returns: an immediate reply, or an operation for a node.

Front handlers never touch key material: they map parsed host-command fields to a normalized
operation (name + plain arguments) that a node worker executes, or answer directly when no HSM
is needed (B2 echo, NO status, field validation errors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocols.hostcmd.fields import Values


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Per-request facts a handler may need: tenant LMKs and enabled PIN block formats."""

    tenant: str
    lmk_ids: tuple[str, ...]
    default_lmk: str
    disabled_pin_formats: frozenset[str] = frozenset()
    node_info: dict[str, Any] = field(default_factory=dict)
    #: The tenant's key-block LMK for ``S`` keys when the request has no ``%LL`` (``""``: none).
    keyblock_lmk: str = "01"


@dataclass(frozen=True, slots=True)
class Immediate:
    """Answer without a node."""

    error: str
    values: Values = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Operation:
    """Run ``name`` with ``args`` on a node; ``affinity`` (a key cryptogram) picks a preferred node."""

    name: str
    args: dict[str, Any]
    affinity: str = ""


Handler = Callable[[Values, CommandContext], Immediate | Operation]


def text(v: Values, name: str, default: str = "") -> str:
    """A text field's value, or ``default`` when absent."""
    value = v.get(name)
    if value is None:
        return default
    return value if isinstance(value, str) else value.decode("latin-1")


def lmk_id(v: Values, ctx: CommandContext) -> str | Immediate:
    """The LMK the request selects (``%LL`` or the tenant default); ``13`` if not the tenant's."""
    chosen = text(v, "lmk_id", ctx.default_lmk)
    if chosen not in ctx.lmk_ids:
        return Immediate("13")
    return chosen
