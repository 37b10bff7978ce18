"""OHIF 3 (prebuilt from npm) in headless Chromium loads an HTJ2K-served study progressively, pixel for pixel.

The viewer is configured as ``bench/htj2k.py``'s progressive mode: Cornerstone
fetches the first 64 KB of each frame with ``Range`` (single-part
``image/jphc``, HTJ2K Lossless RPCL, asked for with the ``accept`` query
parameter), draws it at reduced resolution, then fetches the rest.  The study
holds CT slices stored as HTJ2K RPCL (as an HTJ2K tier holds them) and one
stored uncompressed (its frames re-encoded on the fly).  The check: xdsi
answered frame requests with 206 and ``image/jphc``, and the image the viewer
finally shows is, value for value, pydicom's decoding of the original file
(Cornerstone's own WebAssembly OpenJPH decoder did the decoding, not ours).

Needs Debian's Chromium (``/usr/bin/chromium``) and OHIF's built viewer
(``npm pack @ohif/app@3.13.2``, ``package/dist``) at ``$XDSI_OHIF_DIST`` or
``/tmp/ohif/package/dist``; skipped without them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from pydicom.pixels import pixel_array
from pydicom.uid import UID

from tests.support.stow import stow_raw
from tests.support.server import XdsiProcess
from xdsi.tools.synth import StudySpec, ct_instance
from xdsi.uids import new_uid

HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
OHIF_DIST = Path(os.environ.get("XDSI_OHIF_DIST", "/tmp/ohif/package/dist"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    not (OHIF_DIST / "index.html").is_file() or not Path(CHROMIUM).exists(),
    reason=f"needs Chromium and OHIF's dist at {OHIF_DIST} (XDSI_OHIF_DIST); see bench/ohif_check.py",
)

# the full-resolution image the viewport shows: its id, layout and stored values (base64 of the typed array)
SHOWN = """(() => {
  const cs = window.cornerstone;
  for (const re of cs.getRenderingEngines() || []) for (const vp of re.getViewports()) {
    const img = vp.getCornerstoneImage && vp.getCornerstoneImage();
    if (!img || img.imageQualityStatus !== cs.Enums.ImageQualityStatus.FULL_RESOLUTION) continue;
    const px = img.getPixelData();
    const bytes = new Uint8Array(px.buffer, px.byteOffset, px.byteLength);
    let s = '';
    for (let i = 0; i < bytes.length; i += 8192) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
    return {id: img.imageId, type: px.constructor.name, rows: img.rows, columns: img.columns, slope: img.slope,
            intercept: img.intercept, scaled: !!(img.preScale && img.preScale.scaled), data: btoa(s)};
  }
  return null;
})()"""
VIEWPORT = "const cs = window.cornerstone; const vp = cs.getRenderingEngines()[0].getViewports()[0];"
STACK_SIZE = f"(() => {{ {VIEWPORT} return vp.getImageIds().length; }})()"
DTYPES = {"Int16Array": "<i2", "Uint16Array": "<u2", "Float32Array": "<f4", "Uint8Array": "u1", "Int8Array": "i1"}


def _slice(spec: StudySpec, series: str, number: int) -> tuple[object, np.ndarray]:
    y, x = np.mgrid[0:512, 0:512].astype(np.float64)
    img = np.full((512, 512), -1000.0)
    body = ((x - 256) / 210) ** 2 + ((y - 256) / 170) ** 2 <= 1
    img[body] = 40
    img[body & (np.abs(np.hypot(x - 256, y - 256) - 100 - 5 * number) < 9)] = 900
    img += np.random.default_rng(number).normal(0, 12, img.shape)
    ds = ct_instance(spec, series, number, rows=512, columns=512)
    ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.clip(img, -1024, 3071).astype("<i2").tobytes()
    return ds, img


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[XdsiProcess, str, dict[str, Path]]]:
    import xdsi.archive.htj2k  # noqa: F401  (registers the HTJ2K encoders: the slices are stored as an HTJ2K tier holds them)

    base = tmp_path_factory.mktemp("ohif-htj2k")
    spec = StudySpec(patient_id=f"OH{uuid.uuid4().hex[:6]}", patient_name="OHIF^HTJ2K", description="HTJ2K PROGRESSIVE")
    series = new_uid()
    originals: dict[str, Path] = {}
    stored: list[Path] = []
    for n in range(1, 4):
        ds, _ = _slice(spec, series, n)
        original = base / f"original-{n}.dcm"
        ds.save_as(original, enforce_file_format=True)
        originals[str(ds.SOPInstanceUID)] = original
        if n != 2:  # slice 2 stays uncompressed: its frames are re-encoded on the fly
            ds.compress(UID(HTJ2K_RPCL), generate_instance_uid=False)
        path = base / f"stored-{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        stored.append(path)
    server = XdsiProcess(base / "data").start()
    try:
        r = stow_raw(server, [p.read_bytes() for p in stored])
        assert r.status_code == 200, r.text
        yield server, spec.study_uid, originals
    finally:
        server.stop()


def test_ohif_loads_htj2k_study_progressively(study: tuple[XdsiProcess, str, dict[str, Path]], tmp_path: Path) -> None:
    from bench.htj2k import PROBE, progressive_config
    from bench.ohif_check import DISMISS, Chromium, viewer_server

    server, study_uid, originals = study
    state = {"config": {}, "upstream": f"http://127.0.0.1:{server.http_port}"}
    viewer = viewer_server(OHIF_DIST, state)
    origin = f"http://127.0.0.1:{viewer.server_address[1]}"
    state["config"] = {"/app-config.js": progressive_config(f"{origin}/dicomweb", f"{origin}/wado", mode="progressive", chunk=65536, stored_native=False)}
    chrome = Chromium(CHROMIUM, tmp_path / "chrome", 1200, 800, tmp_path / "chromium.log")
    try:
        chrome.call("Network.setCacheDisabled", cacheDisabled=True)
        chrome.call("Page.addScriptToEvaluateOnNewDocument", source=PROBE)
        chrome.call("Page.navigate", url=f"{origin}/viewer?StudyInstanceUIDs={study_uid}")
        shown = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and shown is None:
            time.sleep(0.5)
            chrome.evaluate(DISMISS)
            if (chrome.evaluate("window.__htj2k") or {}).get("full"):
                shown = chrome.evaluate(SHOWN)
        assert shown is not None, f"no full-resolution image within 120 s; frames {_frames(chrome)}; console {chrome.problems()[:10]}"
        probe = chrome.evaluate("window.__htj2k")
        everything = [shown]
        count = chrome.evaluate(STACK_SIZE)
        for index in range(count):  # every slice: the stored HTJ2K ones and the one re-encoded on the fly
            chrome.evaluate(f"(() => {{ {VIEWPORT} vp.setImageIdIndex({index}); return 1; }})()")
            wanted = chrome.evaluate(f"(() => {{ {VIEWPORT} return vp.getImageIds()[{index}]; }})()")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.3)
                now = chrome.evaluate(SHOWN)
                if now is not None and now["id"] == wanted:
                    everything.append(now)
                    break
            else:
                raise AssertionError(f"slice {index} ({wanted}) not shown at full resolution within 60 s")
        frames = _frames(chrome)
    finally:
        chrome.close()
        viewer.shutdown()
        viewer.server_close()

    ranged = [r for r in frames if r["status"] == 206]
    assert ranged, f"no frame was fetched by Range: {frames}"
    done = [r for r in frames if r["status"]]
    assert all(r["content_type"] == f"image/jphc; transfer-syntax={HTJ2K_RPCL}" for r in done), done
    assert not [r for r in frames if r["status"] not in (0, 200, 206)], frames  # 0: still in flight when we looked
    assert probe["first"]["quality"] in (6, 7, 8)
    assert count == len(originals) and {_sop(s) for s in everything} == set(originals)
    for shown in everything:
        sop = _sop(shown)
        got = np.frombuffer(base64.b64decode(shown["data"]), dtype=DTYPES[shown["type"]]).astype(np.float64).reshape(shown["rows"], shown["columns"])
        want = pixel_array(originals[sop]).astype(np.float64)  # pydicom's decoding of the original
        if shown["scaled"]:  # Cornerstone applied the modality LUT while decoding
            want = want * float(shown["slope"]) + float(shown["intercept"])
        assert np.array_equal(got, want), f"{sop}: {int((got != want).sum())} values differ"


def _sop(shown: dict) -> str:
    return re.search(r"/instances/([0-9.]+)/frames/", shown["id"]).group(1)  # type: ignore[union-attr]


def _frames(chrome) -> list[dict]:  # type: ignore[no-untyped-def]
    return [r for r in chrome.requests.values() if "/frames/" in r["url"]]
