"""Who is asking: the identity an HTTP or SOAP request was authenticated as, for rights checks and audit."""
from __future__ import annotations
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["Principal", "ENVIRON_KEY"]
ENVIRON_KEY = "xdsi.principal"

@dataclass(frozen=True)
class Principal:
    subject: str
    rights: frozenset[str]
    via: str  # "bearer" | "basic" | "xua" | "tls" | "anonymous"
    attributes: Mapping[str, str] = field(default_factory=dict)
