"""The shared renderer: pixel values, geometry, presentation state and refusals, checked on decoded output."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless

from xdsi.render import (
    GIF,
    JPEG,
    PNG,
    InvalidParameter,
    NotRenderable,
    UnsupportedParameter,
    parse_annotation,
    parse_region,
    render,
)
from xdsi.tools.synth import StudySpec, ct_instance
from xdsi.uids import new_uid


def _image(values: np.ndarray, **kw: object) -> Dataset:
    """A CT instance whose stored values are ``values`` (uint16), rescale -1024, window 40/400."""
    rows, cols = values.shape[-2:]
    ds = ct_instance(StudySpec(), new_uid(), 1, rows=rows, columns=cols)
    if values.ndim == 3:
        ds.NumberOfFrames = values.shape[0]
    ds.PixelData = values.astype(np.uint16).tobytes()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_explicit_window_maps_values_per_ps33_linear_formula() -> None:
    # stored 1024 + hu; window C=0 W=100 -> hu <= -50.5 black, > 49.5 white, 0 -> ~128
    hu = np.array([[-1000, -51, 0, 50, 1000, 0, 0, 0]] * 4)
    png = _decode(render(_image(hu + 1024), content_type=PNG, window_center=0, window_width=100))
    assert png.shape == (4, 8)
    assert list(png[0, :5]) == [0, 0, 129, 255, 255]


def test_dataset_window_used_when_none_given_and_min_max_without_one() -> None:
    hu = np.array([[-1000, -160, 40, 240, 1000, 40, 40, 40]] * 2)
    ds = _image(hu + 1024)  # WindowCenter 40, WindowWidth 400
    png = _decode(render(ds, content_type=PNG))
    assert png[0, 0] == 0 and png[0, 4] == 255 and 126 <= png[0, 2] <= 129
    del ds.WindowCenter
    del ds.WindowWidth
    png = _decode(render(ds, content_type=PNG))
    assert png[0, 0] == 0 and png[0, 4] == 255 and 0 < png[0, 2] < 255


def test_monochrome1_is_inverted() -> None:
    vals = np.array([[0, 4095]] * 2)
    ds = _image(vals, PhotometricInterpretation="MONOCHROME1")
    del ds.WindowCenter
    del ds.WindowWidth
    png = _decode(render(ds, content_type=PNG))
    assert png[0, 0] == 255 and png[0, 1] == 0


def test_rows_columns_keep_aspect_and_region_crops_before_scaling() -> None:
    vals = np.zeros((100, 200), dtype=np.uint16)
    vals[:, 100:] = 4095  # right half bright
    ds = _image(vals)
    assert _decode(render(ds, content_type=PNG, rows=50)).shape == (50, 100)
    assert _decode(render(ds, content_type=PNG, columns=50)).shape == (25, 50)
    assert _decode(render(ds, content_type=PNG, rows=50, columns=50)).shape == (25, 50)
    right = _decode(render(ds, content_type=PNG, region=(0.5, 0.0, 1.0, 1.0)))
    assert right.shape == (100, 100) and right.min() == 255
    left = _decode(render(ds, content_type=PNG, region=(0.0, 0.0, 0.5, 0.5), columns=20))
    assert left.shape == (10, 20) and left.max() == 0


def test_frame_number_selects_the_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 8), v) for v in (0, 2048, 4095)])
    ds = _image(frames)
    del ds.WindowCenter
    del ds.WindowWidth
    ds.WindowCenter = 2048 - 1024
    ds.WindowWidth = 4096
    p = tmp_path / "mf.dcm"
    ds.save_as(p, enforce_file_format=True)
    means = [int(_decode(render(p, content_type=PNG, frame_number=n)).mean()) for n in (1, 2, 3)]
    assert means[0] < 5 and 120 < means[1] < 135 and means[2] > 250
    with pytest.raises(InvalidParameter) as exc:
        render(p, frame_number=4)
    assert exc.value.parameter == "frame_number"


def test_compressed_file_renders_like_uncompressed(tmp_path: Path) -> None:
    vals = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    ds = _image(vals)
    plain = render(ds, content_type=PNG)
    ds.compress(RLELossless)
    p = tmp_path / "rle.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert np.array_equal(_decode(render(p, content_type=PNG)), _decode(plain))


def test_output_formats_and_quality() -> None:
    ds = _image((np.random.default_rng(1).integers(0, 4096, (64, 64))))
    assert render(ds, content_type=JPEG).startswith(b"\xff\xd8")
    assert render(ds, content_type=PNG).startswith(b"\x89PNG")
    assert render(ds, content_type=GIF).startswith(b"GIF8")
    assert len(render(ds, image_quality=10)) < len(render(ds, image_quality=95))


def test_annotation_burns_text_in() -> None:
    ds = _image(np.zeros((128, 128)))
    plain = _decode(render(ds, content_type=PNG))
    pat = _decode(render(ds, content_type=PNG, annotation=("patient",)))
    tech = _decode(render(ds, content_type=PNG, annotation=("technique",)))
    assert plain.max() == 0
    assert pat[:40].max() > 200 and pat[90:].max() == 0  # top-left block (anti-aliased text)
    assert tech[90:].max() > 200 and tech[:40].max() == 0  # bottom-left block


def _gsps(**kw: object) -> Dataset:
    ps = Dataset()
    ps.SOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"
    ps.PresentationLUTShape = "IDENTITY"
    for k, v in kw.items():
        setattr(ps, k, v)
    return ps


def test_presentation_state_voi_inversion_shutter_and_rotation() -> None:
    vals = np.zeros((10, 20), dtype=np.uint16)
    vals[:, :10] = 1024  # HU 0 on the left, -1024 on the right
    ds = _image(vals)
    voi = Dataset()
    voi.WindowCenter = -512
    voi.WindowWidth = 2
    ps = _gsps(SoftcopyVOILUTSequence=Sequence([voi]))
    out = _decode(render(ds, content_type=PNG, presentation_state=ps))
    assert out[0, 0] == 255 and out[0, 19] == 0
    ps.PresentationLUTShape = "INVERSE"
    out = _decode(render(ds, content_type=PNG, presentation_state=ps))
    assert out[0, 0] == 0 and out[0, 19] == 255
    ps = _gsps(
        SoftcopyVOILUTSequence=Sequence([voi]),
        ShutterShape="RECTANGULAR",
        ShutterLeftVerticalEdge=3,
        ShutterRightVerticalEdge=20,
        ShutterUpperHorizontalEdge=1,
        ShutterLowerHorizontalEdge=10,
        ShutterPresentationValue=0xFFFF,
    )
    out = _decode(render(ds, content_type=PNG, presentation_state=ps))
    assert out[0, 0] == 255 and out[0, 1] == 255 and out[0, 2] == 255 and out[0, 15] == 0
    ps = _gsps(SoftcopyVOILUTSequence=Sequence([voi]), ImageRotation=90)
    out = _decode(render(ds, content_type=PNG, presentation_state=ps))
    assert out.shape == (20, 10)
    assert out[0, 0] == 255 and out[19, 0] == 0  # left (bright) half is now on top


def test_presentation_state_voi_applies_only_to_referenced_images() -> None:
    ds = _image(np.full((4, 4), 1024))
    voi = Dataset()
    voi.WindowCenter = -500
    voi.WindowWidth = 10
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    voi.ReferencedImageSequence = Sequence([ref])
    ps = _gsps(SoftcopyVOILUTSequence=Sequence([voi]))
    # not referenced: falls back to the image's own window 40/400 -> HU 0 is mid-grey
    out = _decode(render(ds, content_type=PNG, presentation_state=ps))
    assert 100 < out[0, 0] < 130


def test_refusals_name_the_parameter() -> None:
    ds = _image(np.zeros((8, 8)))
    cases = [
        (dict(content_type="application/pdf"), UnsupportedParameter, "content_type"),
        (dict(rows=0), InvalidParameter, "rows"),
        (dict(columns=100000), InvalidParameter, "columns"),
        (dict(window_center=40), InvalidParameter, "window_width"),
        (dict(window_width=40), InvalidParameter, "window_center"),
        (dict(window_center=40, window_width=0), InvalidParameter, "window_width"),
        (dict(image_quality=0), InvalidParameter, "image_quality"),
        (dict(frame_number=0), InvalidParameter, "frame_number"),
        (dict(frame_number=2), InvalidParameter, "frame_number"),
        (dict(region=(0.5, 0, 0.4, 1)), InvalidParameter, "region"),
        (dict(annotation=("weather",)), InvalidParameter, "annotation"),
    ]
    for kw, exc_type, param in cases:
        with pytest.raises(exc_type) as exc:
            render(ds, **kw)  # type: ignore[arg-type]
        assert exc.value.parameter == param, kw
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    with pytest.raises(NotRenderable):
        render(sr)


def test_text_parsers() -> None:
    assert parse_region("0,0.25,1,0.75") == (0.0, 0.25, 1.0, 0.75)
    for bad in ("0,0,1", "a,b,c,d", "0,0,1.5,1", "0.5,0,0.5,1"):
        with pytest.raises(InvalidParameter):
            parse_region(bad)
    assert parse_annotation("Patient,technique,patient") == ("patient", "technique")
    with pytest.raises(InvalidParameter):
        parse_annotation("patient,x")
