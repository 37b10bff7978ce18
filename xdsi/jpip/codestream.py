"""A JPEG 2000 codestream cut into the data-bins of JPIP (ISO/IEC 15444-9 A.3): headers and precincts.

Why our own parser: a JPP-stream server must know where each packet of each
precinct starts and ends.  The codestream does not say so unless it carries
PLT markers, so the packet headers are decoded (ISO/IEC 15444-1 B.10: tag
trees, code-block inclusion, pass counts, Lblock lengths) without decoding
any coefficient.  The parser checks itself: the packets it finds must use
up every byte of every tile exactly; anything else raises
:class:`Unsupported`, and the server then serves a lossless re-encoding of
the decoded pixels instead (never a guessed cut).

Supported: any number of tiles and tile-parts, COD/COC in the main or first
tile-part header, precinct partitions, layers, SOP/EPH markers, LRCP and RLCP
progressions, and the position-driven ones (RPCL, PCRL, CPRL) when each
tile-component-resolution has one precinct.  Not supported (:class:`Unsupported`):
POC, PPM/PPT (packed packet headers), code-block styles with several
codeword segments (bypass, termination on each pass) and HTJ2K.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

SOC, SOT, SOD, EOC = 0xFF4F, 0xFF90, 0xFF93, 0xFFD9
SIZ, COD, COC, QCD, QCC, POC, PPM, PPT, CAP = 0xFF51, 0xFF52, 0xFF53, 0xFF5C, 0xFF5D, 0xFF5F, 0xFF60, 0xFF61, 0xFF50
SOP_MARKER, EPH_MARKER = 0xFF91, 0xFF92
LRCP, RLCP, RPCL, PCRL, CPRL = range(5)


class Unsupported(ValueError):
    """The codestream uses something this parser does not cut (or is damaged): serve a re-encoding instead."""


@dataclass(frozen=True)
class CodingStyle:
    levels: int  # decomposition levels N_L
    cb_w: int  # code-block width exponent (xcb)
    cb_h: int
    cb_style: int
    precincts: tuple[tuple[int, int], ...]  # (PPx, PPy) per resolution 0..N_L


@dataclass
class Packet:
    layer: int
    resolution: int
    component: int
    precinct: int  # index within the tile-component-resolution (raster order)
    data: bytes  # header (with EPH) and body as in the codestream


@dataclass
class Tile:
    index: int
    x0: int
    y0: int
    x1: int
    y1: int
    header: bytes  # tile-part header marker segments, SOT and SOD excluded (15444-9 A.3.3)
    first_sot: bytes  # the first tile-part's SOT segment without its marker code (OpenJPEG's JPIP dialect)
    packets: list[Packet] = field(default_factory=list)


@dataclass
class Codestream:
    """One codestream, its geometry and its bins; ``data`` is the whole codestream."""

    data: bytes
    main_header: bytes  # SOC up to the first SOT (15444-9 A.3.4: the main header data-bin)
    xsiz: int
    ysiz: int
    xosiz: int
    yosiz: int
    xtsiz: int
    ytsiz: int
    xtosiz: int
    ytosiz: int
    components: list[tuple[int, int]]  # (XRsiz, YRsiz)
    layers: int
    progression: int
    styles: list[CodingStyle]  # per component (main header COD/COC)
    tiles: list[Tile]
    samples: list[tuple[int, bool]] = field(default_factory=list)  # (bit depth, signed) per component (SIZ Ssiz)

    @property
    def tiles_across(self) -> int:
        return _ceildiv(self.xsiz - self.xtosiz, self.xtsiz)

    @property
    def tiles_down(self) -> int:
        return _ceildiv(self.ysiz - self.ytosiz, self.ytsiz)

    @property
    def min_levels(self) -> int:
        return min(s.levels for s in self.styles)

    def size_at(self, discard: int) -> tuple[int, int]:
        """The image size after ``discard`` resolution levels are dropped (15444-9 C.4.2 frame size)."""
        d = 1 << discard
        return _ceildiv(self.xsiz, d) - _ceildiv(self.xosiz, d), _ceildiv(self.ysiz, d) - _ceildiv(self.yosiz, d)

    def precinct_id(self, tile: int, c: int, r: int, p: int) -> int:
        """15444-9 A.3.2.1: I = t + (c + s * num_components) * num_tiles; s counts precincts from resolution 0."""
        t = self.tiles[tile]
        s = sum(_count(_precincts_wh(self, t, c, rr)) for rr in range(r)) + p
        return tile + (c + s * len(self.components)) * len(self.tiles)

    def precinct_rect(self, tile: Tile, c: int, r: int, p: int) -> tuple[int, int, int, int]:
        """The precinct's area on the reference grid (x0, y0, x1, y1), clipped to the tile."""
        st = self.styles[c]
        ppx, ppy = st.precincts[r]
        nw, _nh = _precincts_wh(self, tile, c, r)
        trx0, try0, trx1, try1 = _res_rect(self, tile, c, r)
        px0 = (trx0 >> ppx) + p % nw
        py0 = (try0 >> ppy) + p // nw
        scale = 1 << (st.levels - r)
        xr, yr = self.components[c]
        x0 = max(trx0, px0 << ppx) * scale * xr
        y0 = max(try0, py0 << ppy) * scale * yr
        x1 = min(trx1, (px0 + 1) << ppx) * scale * xr
        y1 = min(try1, (py0 + 1) << ppy) * scale * yr
        return max(x0, tile.x0), max(y0, tile.y0), min(x1, tile.x1), min(y1, tile.y1)


def _ceildiv(a: int, b: int) -> int:
    return -(-a // b)


def _count(wh: tuple[int, int]) -> int:
    return wh[0] * wh[1]


def _tile_comp_rect(cs: Codestream, tile: Tile, c: int) -> tuple[int, int, int, int]:
    xr, yr = cs.components[c]
    return _ceildiv(tile.x0, xr), _ceildiv(tile.y0, yr), _ceildiv(tile.x1, xr), _ceildiv(tile.y1, yr)


def _res_rect(cs: Codestream, tile: Tile, c: int, r: int) -> tuple[int, int, int, int]:
    d = 1 << (cs.styles[c].levels - r)
    x0, y0, x1, y1 = _tile_comp_rect(cs, tile, c)
    return _ceildiv(x0, d), _ceildiv(y0, d), _ceildiv(x1, d), _ceildiv(y1, d)


def _precincts_wh(cs: Codestream, tile: Tile, c: int, r: int) -> tuple[int, int]:
    ppx, ppy = cs.styles[c].precincts[r]
    x0, y0, x1, y1 = _res_rect(cs, tile, c, r)
    w = (_ceildiv(x1, 1 << ppx) - (x0 >> ppx)) if x1 > x0 else 0
    h = (_ceildiv(y1, 1 << ppy) - (y0 >> ppy)) if y1 > y0 else 0
    return w, h


# -- marker segments ---------------------------------------------------------------------------


def _segments(data: bytes, pos: int, stop: set[int]) -> tuple[list[tuple[int, bytes, int]], int]:
    """(marker, segment bytes with marker, start) until a marker in ``stop``; returns them and its position."""
    out = []
    while True:
        if pos + 2 > len(data):
            raise Unsupported("the codestream ends inside a header")
        (marker,) = struct.unpack_from(">H", data, pos)
        if marker in stop:
            return out, pos
        if marker >> 8 != 0xFF or pos + 4 > len(data):
            raise Unsupported(f"no marker at byte {pos}")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > len(data):
            raise Unsupported(f"marker {marker:04X} at {pos} has a bad length")
        out.append((marker, data[pos : pos + 2 + length], pos))
        pos += 2 + length


def _style(seg: bytes, with_scod: bool, scod: int) -> tuple[CodingStyle, int]:
    """(style, Scod) from a COD (``with_scod``) or COC segment body after its component index."""
    if with_scod:
        scod = seg[0]
        spcod = seg[5:]
    else:
        scod_c = seg[0]
        spcod = seg[1:]
        scod = (scod & ~1) | (scod_c & 1)
    levels, xcb, ycb, cb_style = spcod[0], spcod[1] + 2, spcod[2] + 2, spcod[3]
    if scod & 1:
        pp = spcod[5 : 5 + levels + 1]
        if len(pp) != levels + 1:
            raise Unsupported("precinct sizes missing")
        precincts = tuple((b & 0x0F, b >> 4) for b in pp)
    else:
        precincts = tuple((15, 15) for _ in range(levels + 1))
    return CodingStyle(levels, xcb, ycb, cb_style, precincts), scod


def parse(data: bytes) -> Codestream:
    """Cut ``data`` (a raw codestream, SOC first) into its JPIP bins; :class:`Unsupported` if it cannot be cut exactly."""
    try:
        return _parse(bytes(data))
    except (IndexError, struct.error, ZeroDivisionError, ValueError) as exc:
        if isinstance(exc, Unsupported):
            raise
        raise Unsupported(f"damaged codestream: {exc.__class__.__name__}: {exc}") from None


def _parse(data: bytes) -> Codestream:
    if data[:2] != b"\xff\x4f" or data[2:4] != b"\xff\x51":
        raise Unsupported("not a JPEG 2000 codestream (SOC, SIZ)")
    segs, first_sot = _segments(data, 2, {SOT})
    siz = segs[0][1]
    (rsiz, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, csiz) = struct.unpack_from(">HIIIIIIIIH", siz, 4)
    if rsiz & 0x4000:
        raise Unsupported("HTJ2K codestream (Rsiz bit 14)")
    comps = [(siz[41 + 3 * i], siz[42 + 3 * i]) for i in range(csiz)]
    cod = next((s for m, s, _ in segs if m == COD), None)
    if cod is None:
        raise Unsupported("no COD in the main header")
    body = cod[4:]
    style, scod = _style(body, True, 0)
    progression, layers = body[1], struct.unpack_from(">H", body, 2)[0]
    styles = [style] * csiz
    for m, s, _ in segs:
        if m in (POC, PPM):
            raise Unsupported("POC/PPM in the main header")
        if m == COC:
            ci = s[4] if csiz < 257 else struct.unpack_from(">H", s, 4)[0]
            off = 5 if csiz < 257 else 6
            styles[ci] = _style(s[off:], False, scod)[0]
    sop, eph = bool(scod & 2), bool(scod & 4)
    if sop:
        raise Unsupported("SOP marker segments (packets are served as they are, without SOP handling)")
    for st in styles:
        if st.cb_style & (0x01 | 0x04 | 0x40):
            raise Unsupported(f"code-block style {st.cb_style:#x} (several codeword segments or HT)")
    if progression > CPRL:
        raise Unsupported(f"progression order {progression}")
    cs = Codestream(data, data[:first_sot], xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, comps, layers,
                    progression, styles, [], [((siz[40 + 3 * i] & 0x7F) + 1, bool(siz[40 + 3 * i] & 0x80)) for i in range(csiz)])
    ntiles = cs.tiles_across * cs.tiles_down
    bodies: dict[int, list[bytes]] = {}
    headers: dict[int, list[bytes]] = {}
    sots: dict[int, bytes] = {}
    pos = first_sot
    while pos + 2 <= len(data):
        (marker,) = struct.unpack_from(">H", data, pos)
        if marker == EOC:
            break
        if marker != SOT:
            raise Unsupported(f"expected SOT at {pos}")
        lsot, isot, psot, tpsot, tnsot = struct.unpack_from(">HHIBB", data, pos + 2)
        if isot >= ntiles:
            raise Unsupported(f"tile {isot} out of range")
        hsegs, sod = _segments(data, pos + 12, {SOD})
        for m, _s, _ in hsegs:
            if m in (POC, PPT, COD, COC):
                # tile-specific coding styles would change the packet sequence: not cut (re-encoded instead)
                raise Unsupported(f"marker {m:04X} in a tile-part header")
        end = pos + psot if psot else len(data) - 2  # Psot 0: the last tile-part runs to EOC
        if end > len(data) or end < sod + 2:
            raise Unsupported("tile-part length out of range")
        sots.setdefault(isot, data[pos + 2 : pos + 12])
        headers.setdefault(isot, []).extend(s for _m, s, _ in hsegs)
        bodies.setdefault(isot, []).append(data[sod + 2 : end])
        pos = end
    for t in range(ntiles):
        p, q = t % cs.tiles_across, t // cs.tiles_across
        tile = Tile(t, max(xtosiz + p * xtsiz, xosiz), max(ytosiz + q * ytsiz, yosiz),
                    min(xtosiz + (p + 1) * xtsiz, xsiz), min(ytosiz + (q + 1) * ytsiz, ysiz),
                    b"".join(headers.get(t, [])), sots.get(t, b""))
        if t not in bodies:
            raise Unsupported(f"tile {t} has no tile-part")
        tile.packets = _packets(cs, tile, b"".join(bodies[t]), sop, eph)
        cs.tiles.append(tile)
    return cs


# -- packets -----------------------------------------------------------------------------------


def _sequence(cs: Codestream, tile: Tile) -> list[tuple[int, int, int, int]]:
    """(layer, resolution, component, precinct) in the tile's packet order (15444-1 B.12)."""
    nc = len(cs.components)
    maxr = max(s.levels for s in cs.styles) + 1
    counts = {(c, r): _count(_precincts_wh(cs, tile, c, r)) for c in range(nc) for r in range(cs.styles[c].levels + 1)}
    out = []
    if cs.progression == LRCP:
        for l in range(cs.layers):
            for r in range(maxr):
                for c in range(nc):
                    out.extend((l, r, c, p) for p in range(counts.get((c, r), 0)))
        return out
    if cs.progression == RLCP:
        for r in range(maxr):
            for l in range(cs.layers):
                for c in range(nc):
                    out.extend((l, r, c, p) for p in range(counts.get((c, r), 0)))
        return out
    if any(n > 1 for n in counts.values()):
        raise Unsupported("position-driven progression with several precincts")
    order = {RPCL: lambda c, r: (r, c), PCRL: lambda c, r: (c, r), CPRL: lambda c, r: (c, r)}[cs.progression]
    for c, r in sorted(counts, key=lambda k: order(*k)):
        if counts[(c, r)]:
            out.extend((l, r, c, 0) for l in range(cs.layers))
    return out


class _Bits:
    """The packet-header bit reader with JPEG 2000 bit stuffing (a byte after 0xFF carries 7 bits)."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos, self.buf, self.ct = data, pos, 0, 0

    def _byte(self) -> None:
        self.buf = (self.buf << 8) & 0xFFFF
        self.ct = 7 if self.buf == 0xFF00 else 8
        if self.pos >= len(self.data):
            raise Unsupported("a packet header runs past the tile")
        self.buf |= self.data[self.pos]
        self.pos += 1

    def bit(self) -> int:
        if self.ct == 0:
            self._byte()
        self.ct -= 1
        return (self.buf >> self.ct) & 1

    def bits(self, n: int) -> int:
        v = 0
        for _ in range(n):
            v = (v << 1) | self.bit()
        return v

    def align(self) -> int:
        """End of the header: a last 0xFF byte is followed by a stuffed byte; returns the next byte position."""
        if (self.buf & 0xFF) == 0xFF:
            self._byte()
        self.ct = 0
        return self.pos


class _TagTree:
    def __init__(self, w: int, h: int) -> None:
        self.levels: list[tuple[int, int]] = []
        while True:
            self.levels.append((w, h))
            if w * h <= 1:
                break
            w, h = _ceildiv(w, 2), _ceildiv(h, 2)
        self.value = [[1 << 30] * (lw * lh) for lw, lh in self.levels]
        self.low = [[0] * (lw * lh) for lw, lh in self.levels]

    def decode(self, bits: _Bits, x: int, y: int, threshold: int) -> bool:
        """15444-1 B.10.2: whether the leaf's value is below ``threshold`` (reading as few bits as needed)."""
        path = []
        for k, (lw, _lh) in enumerate(self.levels):
            path.append((k, (y >> k) * lw + (x >> k)))
        low = 0
        for k, i in reversed(path):
            if low > self.low[k][i]:
                self.low[k][i] = low
            else:
                low = self.low[k][i]
            while low < threshold and low < self.value[k][i]:
                if bits.bit():
                    self.value[k][i] = low
                else:
                    low += 1
            self.low[k][i] = low
        k, i = path[0]
        return self.value[k][i] < threshold


@dataclass
class _Band:
    cbw: int  # code-blocks across in this precinct
    cbh: int
    included: list[bool]
    lblock: list[int]
    incl: _TagTree
    zero: _TagTree


def _bands(cs: Codestream, tile: Tile, c: int, r: int, p: int) -> list[_Band]:
    st = cs.styles[c]
    ppx, ppy = st.precincts[r]
    nw, _nh = _precincts_wh(cs, tile, c, r)
    trx0, try0, _trx1, _try1 = _res_rect(cs, tile, c, r)
    tcx0, tcy0, tcx1, tcy1 = _tile_comp_rect(cs, tile, c)
    pcx, pcy = (trx0 >> ppx) + p % nw, (try0 >> ppy) + p // nw
    if r == 0:
        orients, xcb, ycb, bppx, bppy = [(0, 0)], min(st.cb_w, ppx), min(st.cb_h, ppy), ppx, ppy
        nb = st.levels
    else:
        orients, xcb, ycb, bppx, bppy = [(1, 0), (0, 1), (1, 1)], min(st.cb_w, ppx - 1), min(st.cb_h, ppy - 1), ppx - 1, ppy - 1
        nb = st.levels - r + 1
    out = []
    for xo, yo in orients:
        half = (1 << (nb - 1)) if r else 0
        bx0 = _ceildiv(tcx0 - half * xo, 1 << nb)
        by0 = _ceildiv(tcy0 - half * yo, 1 << nb)
        bx1 = _ceildiv(tcx1 - half * xo, 1 << nb)
        by1 = _ceildiv(tcy1 - half * yo, 1 << nb)
        px0, py0 = max(bx0, pcx << bppx), max(by0, pcy << bppy)
        px1, py1 = min(bx1, (pcx + 1) << bppx), min(by1, (pcy + 1) << bppy)
        if px1 <= px0 or py1 <= py0:
            w = h = 0
        else:
            w = _ceildiv(px1, 1 << xcb) - (px0 >> xcb)
            h = _ceildiv(py1, 1 << ycb) - (py0 >> ycb)
        out.append(_Band(w, h, [False] * (w * h), [3] * (w * h), _TagTree(max(w, 1), max(h, 1)), _TagTree(max(w, 1), max(h, 1))))
    return out


def _passes(bits: _Bits) -> int:
    if not bits.bit():
        return 1
    if not bits.bit():
        return 2
    n = bits.bits(2)
    if n != 3:
        return 3 + n
    n = bits.bits(5)
    if n != 31:
        return 6 + n
    return 37 + bits.bits(7)


def _packets(cs: Codestream, tile: Tile, body: bytes, sop: bool, eph: bool) -> list[Packet]:
    state: dict[tuple[int, int, int], list[_Band]] = {}
    out = []
    pos = 0
    for l, r, c, p in _sequence(cs, tile):
        start = pos
        bands = state.get((c, r, p))
        if bands is None:
            bands = state[(c, r, p)] = _bands(cs, tile, c, r, p)
        bits = _Bits(body, pos)
        total = 0
        if bits.bit():
            for band in bands:
                for i in range(band.cbw * band.cbh):
                    x, y = i % band.cbw, i // band.cbw
                    if band.included[i]:
                        inc = bool(bits.bit())
                    else:
                        inc = band.incl.decode(bits, x, y, l + 1)
                    if not inc:
                        continue
                    if not band.included[i]:
                        k = 0
                        while not band.zero.decode(bits, x, y, k + 1):
                            k += 1
                            if k > 64:
                                raise Unsupported("zero bit-planes out of range")
                        band.included[i] = True
                    n = _passes(bits)
                    while bits.bit():
                        band.lblock[i] += 1
                    total += bits.bits(band.lblock[i] + int(math.floor(math.log2(n))))
        pos = bits.align()
        if eph:
            if body[pos : pos + 2] != b"\xff\x92":
                raise Unsupported("EPH marker missing")
            pos += 2
        pos += total
        if pos > len(body):
            raise Unsupported("a packet runs past the tile")
        out.append(Packet(l, r, c, p, body[start:pos]))
    if pos != len(body):
        raise Unsupported(f"{len(body) - pos} bytes of tile {tile.index} are in no packet")
    return out


def explicit_precincts(data: bytes) -> bytes:
    """The same codestream with the default precinct size (2^15) written out in its main-header COD.

    Equivalent coding (15444-1 A.6.1: no precinct partition means precincts of
    2^15 x 2^15), so every packet stays as it is.  OpenJPEG's JPIP client
    (``opj_jpip_transcode``) reads precinct sizes only from an explicit
    partition and reads past its table otherwise, so served codestreams always
    carry one.  Returns ``data`` itself when the COD already has a partition.
    """
    if data[:2] != b"\xff\x4f" or data[2:4] != b"\xff\x51":
        raise Unsupported("not a raw JPEG 2000 codestream (SOC, SIZ), e.g. a JP2 file")
    segs, _first_sot = _segments(data, 2, {SOT})
    for marker, seg, start in segs:
        if marker != COD:
            continue
        if seg[4] & 1:
            return data
        levels = seg[9]
        new = bytearray(seg)
        new[4] |= 1
        new += b"\xff" * (levels + 1)
        new[2:4] = struct.pack(">H", len(new) - 2)
        return data[:start] + bytes(new) + data[start + len(seg) :]
    raise Unsupported("no COD in the main header")
