"""JPP-stream messages (ISO/IEC 15444-9 A.2) and the choice of data-bins for a view window (C.4, Annex D).

A response is a sequence of messages, each a byte range of one data-bin:
the main header (class 6), a tile header (class 2) or a precinct (class 0,
its packets in layer order), closed by an EOR message.  What the client
already holds (the cache model: bin -> bytes held from the start) is never
sent again; what is sent is added to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, MutableMapping

from xdsi.jpip.codestream import Codestream, Tile

PRECINCT, TILE_HEADER, MAIN_HEADER, METADATA = 0, 2, 6, 8
EOR_IMAGE_DONE, EOR_WINDOW_DONE, EOR_BYTE_LIMIT = 1, 2, 4

BinKey = tuple[int, int, int]  # (class, codestream, in-class id)
Model = MutableMapping[BinKey, int]  # bytes held from the start of each bin


def vbas(value: int) -> bytes:
    """A variable-length byte-aligned segment: 7 bits a byte, most significant first, high bit = more follow."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def message_header(cls: int, csn: int, in_class: int, offset: int, length: int, last: bool) -> bytes:
    """Bin-ID (with class and codestream given explicitly, indicator 3), Class, CSn, Msg-Offset, Msg-Length."""
    groups = []  # 7-bit groups of the in-class id, least significant first; the first byte takes the top 4 bits
    rest = in_class
    while rest >= 16:
        groups.append(rest & 0x7F)
        rest >>= 7
    first = (0x80 if groups else 0) | (3 << 5) | (0x10 if last else 0) | rest
    tail = bytes(g | (0x80 if i else 0) for i, g in enumerate(groups))[::-1]
    return bytes([first]) + tail + vbas(cls) + vbas(csn) + vbas(offset) + vbas(length)


def eor(reason: int) -> bytes:
    """The EOR message (15444-9 D.3): 0x00, the reason code, an empty body."""
    return bytes([0, reason, 0])


@dataclass(frozen=True)
class Window:
    """The view window of a request, already mapped onto this codestream."""

    discard: int  # resolution levels dropped (from fsiz)
    x0: int  # region on the reference grid
    y0: int
    x1: int
    y1: int
    layers: int


@dataclass(frozen=True)
class Bin:
    cls: int
    in_class: int
    parts: tuple[bytes, ...]  # the bin's content in order (precinct: one packet per layer)
    wanted: int  # bytes of the bin this window needs


def tile_header_bin(tile: Tile, openjpeg_dialect: bool) -> bytes:
    """15444-9 A.3.3 (markers without SOT and SOD); OpenJPEG's JPIP tools expect SOT's body before and SOD after."""
    if not openjpeg_dialect:
        return tile.header
    sot = tile.first_sot[:8] + b"\x00\x01"  # one tile-part in the codestream the client rebuilds
    return sot + tile.header + b"\xff\x93"


def window_bins(cs: Codestream, w: Window, openjpeg_dialect: bool = False) -> Iterable[Bin]:
    """The bins a window needs, in the order a client can use them: main header, then per tile its header and precincts."""
    yield Bin(MAIN_HEADER, 0, (cs.main_header,), len(cs.main_header))
    for tile in cs.tiles:
        if tile.x1 <= w.x0 or tile.x0 >= w.x1 or tile.y1 <= w.y0 or tile.y0 >= w.y1:
            continue
        th = tile_header_bin(tile, openjpeg_dialect)
        yield Bin(TILE_HEADER, tile.index, (th,), len(th))
        by_precinct: dict[tuple[int, int, int], list[bytes]] = {}
        for pk in tile.packets:
            by_precinct.setdefault((pk.resolution, pk.component, pk.precinct), []).append(pk.data)
        for (r, c, p), packets in sorted(by_precinct.items()):
            if r > cs.styles[c].levels - w.discard:
                continue
            x0, y0, x1, y1 = cs.precinct_rect(tile, c, r, p)
            # a precinct's coefficients reach past its area by the wavelet's support (4 samples of its resolution
            # covers the 9/7 and 5/3 filters): such a neighbour is needed to decode the region's edge exactly
            xr, yr = cs.components[c]
            mx, my = (4 * xr) << (cs.styles[c].levels - r), (4 * yr) << (cs.styles[c].levels - r)
            x0, y0, x1, y1 = x0 - mx, y0 - my, x1 + mx, y1 + my
            if x1 <= w.x0 or x0 >= w.x1 or y1 <= w.y0 or y0 >= w.y1:
                continue
            wanted = sum(len(d) for d in packets[: w.layers])
            yield Bin(PRECINCT, cs.precinct_id(tile.index, c, r, p), tuple(packets), wanted)


def respond(cs: Codestream, csn: int, w: Window, model: Model, *, byte_limit: int | None = None,
            openjpeg_dialect: bool = False) -> tuple[list[bytes], bool]:
    """The messages for ``w`` that ``model`` does not hold (the model is updated); and whether a byte limit cut it."""
    out: list[bytes] = []
    sent = 0
    for b in window_bins(cs, w, openjpeg_dialect):
        key = (b.cls, csn, b.in_class)
        known = model.get(key)
        total = sum(len(p) for p in b.parts)
        if known is None and total == 0:  # an empty bin (a tile header without markers): say it is complete
            out.append(message_header(b.cls, csn, b.in_class, 0, 0, True))
            model[key] = 0
            continue
        held = known or 0
        if held >= b.wanted:
            continue
        start = 0
        for part in b.parts:
            end = start + len(part)
            if end > held and start < b.wanted:
                lo = max(held, start)
                body = part[lo - start :]
                if byte_limit is not None and sent + len(body) > byte_limit and (sent > 0 or byte_limit == 0):
                    # cut between messages, never inside a packet (OpenJPEG's client takes a precinct's messages
                    # as whole packets); a first message larger than a non-zero limit still goes, so a client
                    # asking for less than one packet makes progress
                    return out, True
                out.append(message_header(b.cls, csn, b.in_class, lo, len(body), end == total) + body)
                sent += len(body)
                model[key] = end
            start = end
            if start >= b.wanted:
                break
    return out, False


def whole_image_held(cs: Codestream, csn: int, model: Model) -> bool:
    """Whether the client now holds every bin of the codestream completely (EOR "image done")."""
    full = Window(0, 0, 0, cs.xsiz, cs.ysiz, cs.layers)
    return all(model.get((b.cls, csn, b.in_class), -1) >= sum(len(p) for p in b.parts) for b in window_bins(cs, full))
