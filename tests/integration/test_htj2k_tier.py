"""WADO-RS frames answered from an HTJ2K tier (issue 16 part 4): ``xdsi migrate`` compresses, ``xdsi serve`` sends as stored.

The study is received uncompressed, ``xdsi migrate`` (the CLI, a process of
its own) moves it onto a ``compress = "htj2k-lossless"`` tier, and the running
server then answers ``transfer-syntax=*`` and HTJ2K RPCL frame requests with
the tier's codestream itself (nothing re-encoded: the bitstream is the stored
fragment, byte for byte), honours Range on it, and every pixel is pydicom's
decoding of the file that was sent in.  Other syntaxes are still produced
from the tier's copy (native frames decoded).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
from pydicom import dcmread
from pydicom.encaps import get_frame
from pydicom.uid import ExplicitVRLittleEndian

from tests.integration.test_htj2k_frames import HTJ2K_RPCL, ct_dataset, decode_frame, markers, parts, phantom, Held, twelve_bit
from tests.support.environ import environ_with
from tests.support.stow import stow_raw
from tests.support.server import XdsiProcess
from xdsi.tools.synth import StudySpec
from xdsi.uids import new_uid


@pytest.fixture(scope="module")
def tiered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[XdsiProcess, dict[str, Held], Path]]:
    base = tmp_path_factory.mktemp("htj2k-tier")
    cfg = base / "xdsi.toml"
    cfg.write_text(
        "[storage]\nrecall_on_read = false\n"
        '[[storage.tiers]]\nname = "hot"\npath = "hot"\nmigrate_after_days = 0\n'
        '[[storage.tiers]]\nname = "htj2k"\npath = "htj2k"\ncompress = "htj2k-lossless"\n'
    )
    study = StudySpec(patient_id=f"HTT{uuid.uuid4().hex[:6]}", patient_name="HTJ2K^TIER")
    held: dict[str, Held] = {}
    for key, ds in {"ct512": ct_dataset(study, new_uid(), 1, phantom(seed=3)), "bits12": twelve_bit(study, new_uid())}.items():
        path = base / f"{key}.dcm"
        ds.save_as(path, enforce_file_format=True)
        held[key] = Held(key, dcmread(path), path)
    server = XdsiProcess(base / "data", config=cfg).start()
    try:
        r = stow_raw(server, [h.path.read_bytes() for h in held.values()])
        assert r.status_code == 200, r.text
        migrate = subprocess.run(
            [sys.executable, "-m", "xdsi", "migrate", "--config", str(cfg), "--data-dir", str(base / "data")],
            capture_output=True, text=True, timeout=300, env=environ_with(),
        )  # fmt: skip
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        yield server, held, base / "data"
    finally:
        server.stop()


def _url(server: XdsiProcess, h: Held, frames: str = "1") -> str:
    ds = h.ds
    return (
        f"http://127.0.0.1:{server.http_port}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/{frames}"
    )


@pytest.mark.parametrize("key", ["ct512", "bits12"])
def test_frames_from_the_htj2k_tier_as_stored(tiered: tuple[XdsiProcess, dict[str, Held], Path], key: str) -> None:
    server, held, data = tiered
    h = held[key]
    tier_files = [p for p in data.rglob("*") if p.is_file() and "htj2k" in p.relative_to(data).parts[:-1]]
    on_tier = [p for p in tier_files if dcmread(p, stop_before_pixels=True).SOPInstanceUID == h.ds.SOPInstanceUID]
    assert len(on_tier) == 1, "the migration did not put the instance on the HTJ2K tier"
    assert str(dcmread(on_tier[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == HTJ2K_RPCL
    with open(on_tier[0], "rb") as fh:
        fh.seek(dcmread(on_tier[0], defer_size=64).get_item("PixelData", keep_deferred=True).value_tell)
        fragment = get_frame(fh, 0, number_of_frames=1)

    r = requests.get(_url(server, h), headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}, timeout=60)
    assert r.status_code == 200, r.text
    ((headers, data_),) = parts(r)
    assert headers["content-type"] == f"image/jphc; transfer-syntax={HTJ2K_RPCL}"
    assert data_ == fragment  # the tier's codestream, not a re-encoding
    assert np.array_equal(decode_frame(h, data_, HTJ2K_RPCL), h.reference(0))

    single = {"Accept": f"image/jphc; transfer-syntax={HTJ2K_RPCL}"}
    whole = requests.get(_url(server, h), headers=single, timeout=60)
    assert whole.status_code == 200 and whole.content == fragment
    main, tile_parts = markers(whole.content)
    head = requests.get(_url(server, h), headers={**single, "Range": f"bytes=0-{tile_parts[0][0] - 1}"}, timeout=60)
    assert head.status_code == 206 and head.content == fragment[: tile_parts[0][0]]
    assert head.headers["Content-Range"] == f"bytes 0-{tile_parts[0][0] - 1}/{len(fragment)}"

    native = requests.get(_url(server, h), headers={"Accept": "application/octet-stream"}, timeout=60)
    assert native.status_code == 200 and native.headers["Content-Type"] == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    assert np.array_equal(decode_frame(h, native.content, str(ExplicitVRLittleEndian)), h.reference(0))
