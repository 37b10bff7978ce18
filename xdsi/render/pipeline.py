"""The grayscale / colour display pipeline: stored values to 8-bit display values.

Order follows PS3.3 C.11 (Softcopy Presentation pipeline): modality LUT, VOI
(window or LUT), presentation LUT (polarity), then shutters and spatial
operations on the display image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from xdsi.render.errors import InvalidParameter


def window(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to 0..255 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    x = arr.astype(np.float64, copy=False)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0) * 255.0
    if width < 1:
        raise InvalidParameter("window_width", "must be at least 1 for a LINEAR window")
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    out = ((x - (center - 0.5)) / max(width - 1, 1e-9) + 0.5) * 255.0
    out = np.where(x <= lo, 0.0, np.where(x > hi, 255.0, out))
    return out


def min_max(arr: np.ndarray) -> np.ndarray:
    x = arr.astype(np.float64, copy=False)
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) * (255.0 / (hi - lo))


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _voi_item_for(ps: Dataset, sop_uid: str, frame: int) -> Dataset | None:
    """The Softcopy VOI LUT item of a presentation state that applies to this image and frame."""
    for item in ps.get("SoftcopyVOILUTSequence", []) or []:
        refs = item.get("ReferencedImageSequence")
        if not refs:
            return item
        for ref in refs:
            if str(ref.get("ReferencedSOPInstanceUID", "")) != sop_uid:
                continue
            frames = ref.get("ReferencedFrameNumber")
            if frames in (None, ""):
                return item
            nums = [int(f) for f in (frames if isinstance(frames, (list, tuple)) or frames.__class__.__name__ == "MultiValue" else [frames])]
            if frame in nums:
                return item
    return None


def _lut_to_display(arr: np.ndarray, voi: Dataset) -> np.ndarray:
    """Apply the first VOI LUT of ``voi`` and scale its output range to 0..255."""
    lut = voi.VOILUTSequence[0]
    out = apply_voi_lut(arr, voi, index=0, prefer_lut=True)
    desc = lut.LUTDescriptor
    bits = int(desc[2]) if len(desc) > 2 else 16
    if not 8 <= bits <= 16:
        bits = 16
    return out.astype(np.float64) * (255.0 / float(2**bits - 1))


def grayscale_to_display(
    arr: np.ndarray,
    ds: Dataset,
    *,
    frame: int,
    window_center: float | None,
    window_width: float | None,
    presentation_state: Dataset | None,
) -> tuple[np.ndarray, str]:
    """8-bit display values for one grayscale frame and a description of the VOI used (for annotations)."""
    values = apply_modality_lut(arr, ds)
    voi_source: Dataset | None = None
    if window_center is not None and window_width is not None:
        out = window(values, window_center, window_width, str(ds.get("VOILUTFunction", "LINEAR")))
        how = f"W {window_width:g} C {window_center:g}"
    else:
        if presentation_state is not None:
            voi_source = _voi_item_for(presentation_state, str(ds.get("SOPInstanceUID", "")), frame)
        if voi_source is None and ("WindowCenter" in ds or "VOILUTSequence" in ds):
            voi_source = ds
        if voi_source is not None and "WindowCenter" in voi_source and "WindowWidth" in voi_source:
            c, w = _first(voi_source.WindowCenter), _first(voi_source.WindowWidth)
            out = window(values, c, max(w, 1.0), str(voi_source.get("VOILUTFunction", "LINEAR")))
            how = f"W {w:g} C {c:g}"
        elif voi_source is not None and voi_source.get("VOILUTSequence"):
            out = _lut_to_display(values, voi_source)
            how = "VOI LUT"
        else:
            out = min_max(values)
            how = "min-max"
    if presentation_state is not None:
        invert = str(presentation_state.get("PresentationLUTShape", "IDENTITY")).upper() == "INVERSE"
    else:
        invert = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    if invert:
        out = 255.0 - out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), how


def colour_to_display(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """8-bit RGB for colour images (pydicom already converts YBR to RGB when decoding)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric == "PALETTE COLOR":
        # palette LUT entries are 8 or 16 bit regardless of BitsStored
        bits = 16 if arr.dtype.itemsize > 1 and int(np.max(arr)) > 255 else 8
    if bits > 8:
        arr = arr.astype(np.float64) * (255.0 / float(2**bits - 1))
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def is_colour(ds: Dataset) -> bool:
    return int(ds.get("SamplesPerPixel", 1) or 1) > 1 or str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR"
