"""The spatial part of a Grayscale Softcopy Presentation State (PS3.3 A.33.1), applied to an 8-bit display image.

Applied: display shutters (rectangular, circular, polygonal; from the
presentation state, or from the image itself when no presentation state is
given), Displayed Area Selection (cropped to the selected pixels in the
image's own coordinates, clipped to the image; Presentation Size Mode is not
used for scaling: the WADO rows/columns decide the output size), Image
Horizontal Flip and Image Rotation.  The VOI and Presentation LUT Shape are
applied by :mod:`xdsi.render.pipeline`.  Not applied: graphic and text
annotations, overlays, bitmap shutters, the Modality LUT of the presentation
state (the image's own modality LUT is used).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset


def _values(v: Any) -> list[float]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)) or v.__class__.__name__ == "MultiValue":
        return [float(x) for x in v]
    return [float(v)]


def apply_shutters(img: np.ndarray, source: Dataset) -> np.ndarray:
    """Pixels outside every shutter take the Shutter Presentation Value (default black)."""
    shapes = [s.upper() for s in (source.get("ShutterShape") or [])] if not isinstance(source.get("ShutterShape"), str) else [source.ShutterShape.upper()]
    if not shapes:
        return img
    h, w = img.shape[:2]
    keep = np.ones((h, w), dtype=bool)
    if "RECTANGULAR" in shapes:
        left = int(source.get("ShutterLeftVerticalEdge", 1))
        right = int(source.get("ShutterRightVerticalEdge", w))
        upper = int(source.get("ShutterUpperHorizontalEdge", 1))
        lower = int(source.get("ShutterLowerHorizontalEdge", h))
        rect = np.zeros((h, w), dtype=bool)
        rect[max(upper - 1, 0) : max(lower, 0), max(left - 1, 0) : max(right, 0)] = True
        keep &= rect
    if "CIRCULAR" in shapes:
        centre = _values(source.get("CenterOfCircularShutter"))
        radius = float(source.get("RadiusOfCircularShutter", 0) or 0)
        if len(centre) == 2:
            yy, xx = np.ogrid[:h, :w]
            keep &= (yy + 1 - centre[0]) ** 2 + (xx + 1 - centre[1]) ** 2 <= radius**2
    if "POLYGONAL" in shapes:
        v = _values(source.get("VerticesOfThePolygonalShutter"))
        if len(v) >= 6:
            mask = Image.new("1", (w, h), 0)
            ImageDraw.Draw(mask).polygon([(v[i + 1] - 1, v[i] - 1) for i in range(0, len(v) - 1, 2)], fill=1)
            keep &= np.asarray(mask, dtype=bool)
    p_value = source.get("ShutterPresentationValue")
    fill = int(round(int(p_value) * 255 / 0xFFFF)) if p_value not in (None, "") else 0
    out = img.copy()
    out[~keep] = fill
    return out


def _displayed_area(ps: Dataset, sop_uid: str) -> Dataset | None:
    for item in ps.get("DisplayedAreaSelectionSequence", []) or []:
        refs = item.get("ReferencedImageSequence")
        if not refs or any(str(r.get("ReferencedSOPInstanceUID", "")) == sop_uid for r in refs):
            return item
    return None


def apply_presentation_state(img: np.ndarray, ps: Dataset, image: Dataset) -> np.ndarray:
    img = apply_shutters(img, ps)
    area = _displayed_area(ps, str(image.get("SOPInstanceUID", "")))
    if area is not None:
        tl = _values(area.get("DisplayedAreaTopLeftHandCorner"))  # column \ row, 1-based
        br = _values(area.get("DisplayedAreaBottomRightHandCorner"))
        if len(tl) == 2 and len(br) == 2:
            h, w = img.shape[:2]
            c0, r0 = max(int(tl[0]) - 1, 0), max(int(tl[1]) - 1, 0)
            c1, r1 = min(int(br[0]), w), min(int(br[1]), h)
            if c1 > c0 and r1 > r0:
                img = img[r0:r1, c0:c1]
    if str(ps.get("ImageHorizontalFlip", "N")).upper() == "Y":
        img = img[:, ::-1]
    rotation = int(ps.get("ImageRotation", 0) or 0) % 360
    if rotation:
        # DICOM rotation is clockwise; np.rot90 turns counter-clockwise
        img = np.rot90(img, k=-(rotation // 90))
    return np.ascontiguousarray(img)
