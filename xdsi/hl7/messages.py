"""Reading a received HL7 v2 message and answering it: python-hl7 parses, this module adds the safety.

Why a layer over python-hl7: its accessors raise ``KeyError`` / ``IndexError`` on an
absent segment or field, and its ``create_ack`` needs an intact MSH and writes no ERR
segment.  A listener must answer *every* block, so a message with a broken MSH still gets
an ``AR`` with the reason (HL7 v2.5 chapter 2.9, ERR segment with a table 0357 code).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import hl7
from hl7.exceptions import HL7Exception

__all__ = ["Hl7Error", "Received", "parse", "ack", "nak_unparsed"]

# HL7 table 0357 (message error condition codes) that we answer with
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
UNSUPPORTED_PROCESSING_ID = "202"
UNKNOWN_KEY_IDENTIFIER = "204"
APPLICATION_INTERNAL_ERROR = "207"
_CODE_TEXT = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}


class Hl7Error(Exception):
    """Why a message is not accepted: the ACK code (AE or AR), a table 0357 code, where, and a text for a person.

    ``AR`` (reject): the message itself is unusable (malformed, unsupported type); sending it
    again unchanged will fail again.  ``AE`` (error): it was understood but could not be
    applied (a required field empty, an unknown patient to merge, the index failed).
    """

    def __init__(self, ack_code: str, code: str, text: str, location: str = "") -> None:
        super().__init__(text)
        self.ack_code = ack_code
        self.code = code
        self.text = text
        self.location = location  # ERL as "SEG^seq^field" (e.g. "PID^1^3"), "" when not one field


@dataclass(frozen=True)
class Received:
    """A parsed message and the MSH values every handler needs."""

    message: Any  # hl7.Message
    message_type: str  # "ORM^O01" (MSH-9.1 ^ MSH-9.2)
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12

    def get(self, segment: str, field: int, component: int = 1, repetition: int = 1, occurrence: int = 1) -> str:
        """One component of one field, unescaped; "" when the segment, field or component is absent."""
        try:
            value = self.message.extract_field(segment, occurrence, field, repetition, component)
        except (KeyError, IndexError):
            return ""
        return self.message.unescape(str(value)).strip() if value else ""

    def value(self, segment: str, field: int, component: int = 1) -> str | None:
        """Like :meth:`get`, telling "not sent" (None) from the HL7 null ``""`` ("delete the value": "")."""
        try:
            raw = self.message.extract_field(segment, 1, field, 1, component)
        except (KeyError, IndexError):
            return None
        raw = str(raw).strip() if raw else ""
        if raw == '""':
            return ""
        return self.message.unescape(raw).strip() or None

    def raw(self, segment: str, field: int, repetition: int = 1, occurrence: int = 1) -> str:
        """A whole field repetition with its component delimiters, as sent (an XCN, a PL); "" when absent."""
        try:
            seg = self.message.segments(segment)[occurrence - 1]
            value = seg[field]
            if isinstance(value, hl7.Field) and value and isinstance(value[0], hl7.Repetition):
                value = value[repetition - 1]
            return str(value).strip()
        except (KeyError, IndexError):
            return ""

    def has(self, segment: str) -> bool:
        try:
            self.message.segments(segment)
        except KeyError:
            return False
        return True

    def count(self, segment: str) -> int:
        try:
            return len(self.message.segments(segment))
        except KeyError:
            return 0


# HL7 table 0211 (MSH-18 character set) -> Python codec, for the sets a HIS sends in practice
CHARSETS = {
    "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8", "UTF-8": "utf-8",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}


def _charset(block: bytes, default: str) -> str:
    """The codec MSH-18 names (read from the raw MSH, which is ASCII), else ``default`` ([hl7] charset)."""
    head = block.split(b"\r", 1)[0].split(b"\n", 1)[0]
    if len(head) < 4:
        return default
    fields = head.split(head[3:4])
    declared = fields[17].split(b"~")[0].decode("ascii", "replace").strip().upper() if len(fields) > 17 else ""
    if not declared:
        return default
    codec = CHARSETS.get(declared)
    if codec is None:
        raise Hl7Error("AR", DATA_TYPE_ERROR, f"MSH-18 character set {declared!r} is not supported "
                       f"(supported: {', '.join(sorted(CHARSETS))})", "MSH^1^18")
    return codec


def parse(block: bytes, charset: str = "utf-8") -> Received:
    """Parse one MLLP block; :class:`Hl7Error` (``AR``) when it is not an HL7 v2 message with a usable MSH.

    The text is decoded with the character set MSH-18 declares, else ``charset`` (``[hl7] charset``),
    strictly: bytes that are not valid in it are refused (``AR``) rather than replaced, because a
    replaced character in a patient's name would be written into the index by an ADT^A08.
    """
    try:
        text = block.decode(_charset(block, charset))
    except UnicodeDecodeError as exc:
        raise Hl7Error("AR", DATA_TYPE_ERROR, f"byte {exc.start} is not valid {exc.encoding}: declare the character set in MSH-18 "
                       "or set [hl7] charset") from None
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH"):
        raise Hl7Error("AR", SEGMENT_SEQUENCE_ERROR, "the message does not begin with an MSH segment", "MSH^1")
    if len(text) < 8 or text[4:8].count(text[3]) or not text[3].strip():
        raise Hl7Error("AR", DATA_TYPE_ERROR, "MSH-1/MSH-2 (field separator, encoding characters) are not valid", "MSH^1^2")
    try:
        message = hl7.parse(text)
    except (HL7Exception, ValueError, IndexError, KeyError, AssertionError) as exc:
        raise Hl7Error("AR", DATA_TYPE_ERROR, f"the message cannot be parsed: {exc}") from None
    r = Received(message, "", "", "", "")
    code, event = r.get("MSH", 9, 1), r.get("MSH", 9, 2)
    r = Received(message, f"{code}^{event}", r.get("MSH", 10), r.get("MSH", 11), r.get("MSH", 12))
    if not code or not event:
        raise Hl7Error("AR", REQUIRED_FIELD_MISSING, "MSH-9 (message type and trigger event) is empty", "MSH^1^9")
    if not r.control_id:
        raise Hl7Error("AR", REQUIRED_FIELD_MISSING, "MSH-10 (message control ID) is empty", "MSH^1^10")
    return r


_counter = itertools.count(1)


def _control_id() -> str:
    """MSH-10 of our ACK: unique per process and across restarts (time, pid, counter), at most 20 characters."""
    return f"X{int(datetime.now(timezone.utc).timestamp()) % 10**9:09d}{os.getpid() % 10**5:05d}{next(_counter) % 10**5:05d}"


def _escape(value: str) -> str:
    """HL7 escape sequences for the default delimiters (ACK fields we fill from text)."""
    out = value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\").replace("~", "\\R\\")
    return out.replace("\r", " ").replace("\n", " ")


def _msh_value(r: Received | None, field: int) -> str:
    """A field of the received MSH as sent (escaped, components kept); "" without one."""
    return r.raw("MSH", field) if r is not None else ""


def ack(r: Received | None, ack_code: str, *, application: str, facility: str, error: Hl7Error | None = None) -> bytes:
    """An original-mode ACK (HL7 v2.5 2.9.2): MSH, MSA, and an ERR when ``error`` is given.

    Written by hand rather than with ``hl7.Message.create_ack``: that needs an intact MSH,
    and a NAK for a broken one is exactly when an answer matters most.  MSH-9 is
    ``ACK^<event>^ACK``; MSA-2 echoes the received MSH-10 (empty when there was none).
    """
    event = r.message_type.split("^", 1)[1] if r is not None and "^" in r.message_type else ""
    version = (r.version if r is not None and r.version else "2.5")
    processing = (r.processing_id if r is not None and r.processing_id else "P")
    now = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    msh = "|".join([
        "MSH", "^~\\&", _escape(application), _escape(facility), _msh_value(r, 3), _msh_value(r, 4), now, "",
        f"ACK^{event}^ACK" if event else "ACK", _control_id(), _escape(processing), _escape(version),
    ])
    control = _escape(r.control_id) if r is not None else ""
    segments = [msh]
    if error is None:
        segments.append(f"MSA|{ack_code}|{control}")
    else:
        segments.append(f"MSA|{ack_code}|{control}|{_escape(error.text[:80])}")
        erl = "^".join(_escape(p) for p in error.location.split("^")) if error.location else ""
        code = f"{error.code}^{_escape(_CODE_TEXT.get(error.code, ''))}^HL70357"
        # ERR-1 (v2.3 compatibility: ELD) empty, ERR-2 location, ERR-3 code, ERR-4 severity E, ERR-8 user message
        segments.append(f"ERR||{erl}|{code}|E||||{_escape(error.text)}")
    return ("\r".join(segments) + "\r").encode("utf-8")


def nak_unparsed(error: Hl7Error, *, application: str, facility: str) -> bytes:
    """The NAK for a block that is not a usable message (no MSH to copy from)."""
    return ack(None, error.ack_code, application=application, facility=facility, error=error)
