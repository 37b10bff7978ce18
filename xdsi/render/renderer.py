"""Render one frame of a DICOM image to JPEG, PNG or GIF.

One renderer for every front door (WADO-URI, WADO-RS rendered, WADO-WS
RAD-55): the parameters are the WADO ones in Python form, and every refusal
is a :class:`~xdsi.render.errors.RenderError` naming the parameter at fault.

Only the requested frame is decoded (``pydicom.pixels.pixel_array(index=)``),
so a 1,000-frame object does not cost 1,000 frames of memory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from xdsi.archive import content
from xdsi.render.errors import InvalidParameter, NotRenderable, UnsupportedParameter
from xdsi.render.params import ANNOTATIONS, GIF, JPEG, MAX_SIZE, PNG, check_content_type
from xdsi.render.pipeline import colour_to_display, grayscale_to_display, is_colour
from xdsi.render.presentation import apply_presentation_state, apply_shutters

DEFAULT_JPEG_QUALITY = 90


def _check(
    rows: int | None,
    columns: int | None,
    window_center: float | None,
    window_width: float | None,
    image_quality: int | None,
    frame_number: int | None,
) -> None:
    for name, v in (("rows", rows), ("columns", columns)):
        if v is not None and not 1 <= int(v) <= MAX_SIZE:
            raise InvalidParameter(name, f"{v} is outside 1..{MAX_SIZE}")
    if (window_center is None) != (window_width is None):
        raise InvalidParameter(
            "window_width" if window_width is None else "window_center", "window center and width must be given together"
        )
    if window_width is not None and window_width <= 0:
        raise InvalidParameter("window_width", "must be positive")
    if image_quality is not None and not 1 <= int(image_quality) <= 100:
        raise InvalidParameter("image_quality", f"{image_quality} is outside 1..100")
    if frame_number is not None and int(frame_number) < 1:
        raise InvalidParameter("frame_number", "frames are numbered from 1")


def _load(source: str | os.PathLike[str] | Dataset, frame_index: int) -> tuple[Dataset, np.ndarray]:
    try:
        if isinstance(source, Dataset):
            ds = source
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                raise NotRenderable("object", "the object has no pixel data")
            _check_frame(ds, frame_index)
            arr = pixel_array(ds, index=frame_index)
        else:
            path = Path(source)
            ds = dcmread(path, stop_before_pixels=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise NotRenderable("object", "the object has no pixel data")
            if content.transfer_syntax(ds) in content.WHOLE_DATASET_SYNTAXES:
                # deflated / big endian: decoded once, little-endian normalised, so the header's
                # binary values (LUT data) and the pixels are read the same way
                return _load(content.dataset(path), frame_index)
            _check_frame(ds, frame_index)
            arr = content.frame_array(path, frame_index)
    except (NotRenderable, InvalidParameter):
        raise
    except (AttributeError, KeyError) as exc:
        raise NotRenderable("object", f"the object has no renderable pixel data ({exc})") from None
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        raise NotRenderable("object", f"cannot decode the pixel data: {exc}") from None
    return ds, arr


def _check_frame(ds: Dataset, frame_index: int) -> None:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame_index >= frames:
        raise InvalidParameter("frame_number", f"frame {frame_index + 1} requested, the object has {frames}")


def _crop_region(img: np.ndarray, region: tuple[float, float, float, float]) -> np.ndarray:
    h, w = img.shape[:2]
    x0, y0, x1, y1 = region
    c0, c1 = int(np.floor(x0 * w)), max(int(np.ceil(x1 * w)), int(np.floor(x0 * w)) + 1)
    r0, r1 = int(np.floor(y0 * h)), max(int(np.ceil(y1 * h)), int(np.floor(y0 * h)) + 1)
    return img[r0 : min(r1, h), c0 : min(c1, w)]


def target_size(height: int, width: int, rows: int | None, columns: int | None) -> tuple[int, int]:
    """(rows, columns) that fit the requested box keeping the aspect ratio (PS3.18 rows/columns)."""
    if rows is None and columns is None:
        return height, width
    scales = []
    if rows is not None:
        scales.append(rows / height)
    if columns is not None:
        scales.append(columns / width)
    s = min(scales)
    return max(1, min(MAX_SIZE, round(height * s))), max(1, min(MAX_SIZE, round(width * s)))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _text(ds: Dataset, what: str, frame: int, voi: str) -> list[str]:
    def g(kw: str) -> str:
        v = ds.get(kw)
        return "" if v is None else str(v).replace("^", " ").strip()

    if what == "patient":
        lines = [g("PatientName"), f"ID {g('PatientID')}" if g("PatientID") else ""]
        lines.append(" ".join(x for x in (g("PatientBirthDate"), g("PatientSex")) if x))
        return [ln for ln in lines if ln]
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    lines = [
        " ".join(x for x in (g("Modality"), g("StudyDate")) if x),
        " ".join(x for x in (f"Se {g('SeriesNumber')}" if g("SeriesNumber") else "", f"Im {g('InstanceNumber')}" if g("InstanceNumber") else "") if x),
        f"Fr {frame}/{frames}" if frames > 1 else "",
        voi,
        " ".join(x for x in (f"{g('KVP')} kV" if g("KVP") else "", f"{g('SliceThickness')} mm" if g("SliceThickness") else "") if x),
    ]
    return [ln for ln in lines if ln]


def _annotate(img: Image.Image, ds: Dataset, annotation: Iterable[str], frame: int, voi: str) -> Image.Image:
    size = max(9, min(img.width, img.height) // 24)
    font = _font(size)
    draw = ImageDraw.Draw(img)
    white = 255 if img.mode == "L" else (255, 255, 255)
    black = 0 if img.mode == "L" else (0, 0, 0)
    pad = max(2, size // 4)
    for what in annotation:
        lines = _text(ds, what, frame, voi)
        if not lines:
            continue
        step = size + pad
        y = pad if what == "patient" else img.height - pad - step * len(lines)
        for line in lines:
            draw.text((pad, y), line, fill=white, font=font, stroke_width=1, stroke_fill=black)
            y += step
    return img


def _encode(img: Image.Image, content_type: str, image_quality: int | None) -> bytes:
    buf = io.BytesIO()
    if content_type == JPEG:
        img.save(buf, format="JPEG", quality=image_quality or DEFAULT_JPEG_QUALITY)
    elif content_type == PNG:
        img.save(buf, format="PNG")
    elif content_type == GIF:
        if img.mode != "L":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
        img.save(buf, format="GIF")
    else:  # pragma: no cover - check_content_type guards this
        raise UnsupportedParameter("content_type", content_type)
    return buf.getvalue()


def render(
    source: str | os.PathLike[str] | Dataset,
    *,
    content_type: str = JPEG,
    rows: int | None = None,
    columns: int | None = None,
    region: tuple[float, float, float, float] | None = None,
    window_center: float | None = None,
    window_width: float | None = None,
    frame_number: int | None = None,
    image_quality: int | None = None,
    annotation: Iterable[str] = (),
    presentation_state: Dataset | None = None,
) -> bytes:
    """Render one frame (``frame_number``, 1-based, default 1) of ``source`` and return the encoded image.

    ``region`` is (xmin, ymin, xmax, ymax) as fractions of the displayed
    image, applied before scaling to fit ``rows`` x ``columns`` (aspect
    kept).  VOI: explicit center/width, else the presentation state's, else
    the image's window or VOI LUT, else the frame's min-max.  ``annotation``
    holds "patient" and/or "technique".
    """
    content_type = check_content_type(content_type)
    _check(rows, columns, window_center, window_width, image_quality, frame_number)
    annotation = tuple(annotation)
    for a in annotation:
        if a not in ANNOTATIONS:
            raise InvalidParameter("annotation", f"{a!r} is not one of {', '.join(ANNOTATIONS)}")
    if region is not None:
        x0, y0, x1, y1 = region
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise InvalidParameter("region", "values must satisfy 0 <= xmin < xmax <= 1 and 0 <= ymin < ymax <= 1")
    frame = int(frame_number or 1)
    ds, arr = _load(source, frame - 1)

    if is_colour(ds):
        img = colour_to_display(arr, ds)
        voi = ""
    else:
        if arr.ndim != 2:
            raise NotRenderable("object", f"unexpected pixel array shape {arr.shape}")
        img, voi = grayscale_to_display(
            arr,
            ds,
            frame=frame,
            window_center=window_center,
            window_width=window_width,
            presentation_state=presentation_state,
        )
    if presentation_state is not None:
        img = apply_presentation_state(img, presentation_state, ds)
    elif "ShutterShape" in ds:
        img = apply_shutters(img, ds)
    if region is not None:
        img = _crop_region(img, region)
    h, w = img.shape[:2]
    th, tw = target_size(h, w, rows, columns)
    pil = Image.fromarray(np.ascontiguousarray(img), mode=None)
    if (th, tw) != (h, w):
        pil = pil.resize((tw, th), Image.Resampling.LANCZOS if th * tw < h * w else Image.Resampling.BILINEAR)
    if annotation:
        pil = _annotate(pil, ds, annotation, frame, voi)
    return _encode(pil, content_type, image_quality)
