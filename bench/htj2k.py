"""First-image time in OHIF for a 200-instance CT study served as HTJ2K: progressive (HTTP Range) against full frames.

What it measures, in one run: a fresh ``xdsi serve`` holds a synthetic CT study
(``--instances`` 512x512 slices, 16-bit signed) stored as HTJ2K Lossless RPCL
(1.2.840.10008.1.2.4.202, encoded by xdsi's HTJ2K plugin, as an HTJ2K tier holds
it) or, with ``--stored native``, uncompressed (frames then re-encoded on the
fly).  OHIF 3 (prebuilt from npm, see ``bench/ohif_check.py``) opens the study
in headless Chromium twice per round, with two data-source configurations:

* ``full``: one request per frame, ``multipart/related; transfer-syntax=*``
  (HTJ2K frames as stored, or ``accept=image/jphc...`` when stored native),
  decoded when it has arrived (``streaming: false``);
* ``progressive``: Cornerstone's progressive stack retrieval: the first
  ``--chunk`` bytes of each frame by ``Range`` (single-part ``image/jphc``,
  asked for with the ``accept`` query parameter) drawn at reduced resolution,
  then the rest by a second ``Range`` request and the full image.

Rounds run A B B A (``--rounds``), and each link (``--links``: 0 is
unthrottled loopback, N an N Mbit/s link with ``--latency`` ms for the frame
responses only) is measured in the same run.  The link is a pacing proxy
between the viewer's origin and xdsi that holds each ``/frames/`` answer for
latency + bytes / rate: the viewer's own files and the study's metadata come at
loopback speed in both modes, so what differs is only how the pixels travel
(DevTools' network emulation slowed OHIF's 30 MB of scripts down too and
drowned the difference in app start-up time).  Times come from the page itself (``performance.now()``,
polling Cornerstone's viewport every 5 ms): **first image** is the first image
the viewport shows (any quality), **full** its first full-resolution image;
both from the page's navigation start and from the first frame request (the
app's own loading and the study's metadata are the same in both modes).  Also
counted: frame requests answered 200/206 and their bytes until the full
image.  Writes ``report.md`` and ``results.json`` to ``--out``.

Installs nothing; needs Chromium and OHIF's dist as ``bench/ohif_check.py`` says.

    .venv/bin/python bench/htj2k.py --ohif-dist /tmp/ohif/package/dist --out /tmp/htj2k-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ohif_check import Chromium, Xdsi, ohif_config, viewer_server  # noqa: E402

HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
ACCEPT_QUERY = "accept=" + quote(f"image/jphc;transfer-syntax={HTJ2K_RPCL}", safe="")  # PS3.18 8.3.3.1
ACCEPT_QUERY_MULTIPART = "accept=" + quote(f"multipart/related;type=image/jphc;transfer-syntax={HTJ2K_RPCL}", safe="")

# polled in the page from its first script: when the viewport first shows an image, and a full-resolution one
PROBE = """
window.__htj2k = {first: null, full: null, firstFrameRequest: null};
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) {
    if (window.__htj2k.firstFrameRequest === null && e.name.includes('/frames/')) window.__htj2k.firstFrameRequest = e.startTime;
  }
}).observe({type: 'resource', buffered: true});
(function poll() {
  try {
    const cs = window.cornerstone;
    if (cs && cs.getRenderingEngines) {
      for (const re of cs.getRenderingEngines() || []) {
        for (const vp of re.getViewports()) {
          const img = vp.getCornerstoneImage && vp.getCornerstoneImage();
          if (!img) continue;
          const t = performance.now();
          if (window.__htj2k.first === null) window.__htj2k.first = {t, quality: img.imageQualityStatus, id: img.imageId};
          if (window.__htj2k.full === null && img.imageQualityStatus === cs.Enums.ImageQualityStatus.FULL_RESOLUTION) {
            window.__htj2k.full = {t, id: img.imageId};
          }
        }
      }
    }
  } catch (e) {}
  if (window.__htj2k.full === null) setTimeout(poll, 5);
})();
"""


def progressive_config(dicomweb: str, wado: str, *, mode: str, chunk: int, stored_native: bool) -> str:
    """OHIF's app-config.js for one mode: bench/ohif_check's data source plus Cornerstone's stack retrieve options."""
    text = ohif_config(dicomweb, wado)
    config = json.loads(text[len("window.config = ") : text.rindex(";")])
    source = config["dataSources"][0]["configuration"]
    # thumbnails from /rendered: a "wadors" thumbnail loads the first frame whole, before and for the viewport
    source["thumbnailRendering"] = "rendered"
    if mode == "progressive":
        common = {"urlArguments": ACCEPT_QUERY, "chunkSize": chunk}
        source["stackRetrieveOptions"] = {
            "$set": {
                "stages": [{"id": "lossySequential", "retrieveType": "singleFast"}, {"id": "finalSequential", "retrieveType": "singleFinal"}],
                "retrieveOptions": {"singleFast": {**common, "rangeIndex": 0, "decodeLevel": 3}, "singleFinal": {**common, "rangeIndex": -1}},
            }
        }
    else:
        single: dict[str, Any] = {"streaming": False}
        if stored_native:
            single["urlArguments"] = ACCEPT_QUERY_MULTIPART
        source["stackRetrieveOptions"] = {"$set": {"retrieveOptions": {"single": single}}}
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


def make_study(out: Path, instances: int, stored: str) -> str:
    """``instances`` CT slices of one series (a phantom that changes along the study), as Part 10 files; the study UID."""
    import numpy as np
    from pydicom.uid import UID

    import xdsi.archive.htj2k  # noqa: F401  (registers the HTJ2K encoders)
    from xdsi.tools.synth import StudySpec, ct_instance
    from xdsi.uids import new_uid

    spec = StudySpec(patient_id=f"HTB{uuid.uuid4().hex[:6]}", patient_name="HTJ2K^BENCH", description="HTJ2K BENCH")
    series = new_uid()
    rng = np.random.default_rng(16)
    y, x = np.mgrid[0:512, 0:512].astype(np.float64)
    for i in range(instances):
        z = i / max(instances - 1, 1)
        img = np.full((512, 512), -1000.0)
        body = ((x - 256) / (200 - 30 * abs(z - 0.5))) ** 2 + ((y - 256) / 170) ** 2 <= 1
        img[body] = 40
        img[body & (np.abs(np.hypot(x - 256, y - 256) - (90 + 20 * z)) < 9)] = 900
        for ox, r, v in ((-75, 40 * (1 - abs(z - 0.5)), -850), (75, 40 * (1 - abs(z - 0.5)), -850), (0, 25 + 10 * z, 60)):
            img[np.hypot(x - 256 - ox, y - 240) < r] = v
        img += rng.normal(0, 12, img.shape)
        ds = ct_instance(spec, series, i + 1, rows=512, columns=512)
        ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.clip(img, -1024, 3071).astype("<i2").tobytes()
        if stored == "htj2k":
            ds.compress(UID(HTJ2K_RPCL), generate_instance_uid=False)
        ds.save_as(out / f"{i + 1:04d}.dcm", enforce_file_format=True)
    return spec.study_uid


def pacing_proxy(upstream: str, state: dict[str, float]) -> "http.server.ThreadingHTTPServer":
    """A loopback HTTP proxy to ``upstream`` that delivers ``/frames/`` answers as over a ``state["mbit"]`` link.

    Each frame answer is held until the one shared link has carried it (its size
    over the rate, after the answers before it) plus ``state["latency_ms"]``,
    then sent whole (0 Mbit/s: no delay); everything else passes at once.
    Method, path, headers (Range, Accept) and body go through unchanged.
    """
    import http.client
    import http.server
    import threading

    lock, clock = threading.Lock(), [0.0]  # when the shared link is next free
    hop = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(upstream.split("//", 1)[1], timeout=300)
            conn.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items() if k.lower() not in hop})
            r = conn.getresponse()
            data = r.read()
            conn.close()
            if "/frames/" in self.path and state["mbit"]:
                with lock:  # one shared link: answers queue behind each other (FIFO), as on a real line
                    start = max(time.monotonic(), clock[0])
                    clock[0] = start + len(data) * 8 / (state["mbit"] * 1e6)
                    done = clock[0] + state["latency_ms"] / 1000
                time.sleep(max(0.0, done - time.monotonic()))
            self.send_response(r.status, r.reason)
            for k, v in r.getheaders():
                if k.lower() not in hop:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_POST = do_OPTIONS = _any  # noqa: N815

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pacing", daemon=True).start()
    return server


def stow_in_batches(base: str, paths: list[Path], batch: int = 40) -> None:
    from bench.ohif_check import stow

    for k in range(0, len(paths), batch):
        stow(base, paths[k : k + batch])


def measure(chrome: Chromium, url: str, limit: float) -> dict[str, Any]:
    """One page load of the viewer: the probe's times and the frame requests until the full image."""
    chrome.requests.clear()
    chrome.call("Page.navigate", url=url)
    deadline = time.monotonic() + limit
    probe: dict[str, Any] = {}
    while time.monotonic() < deadline:
        time.sleep(0.05)
        probe = chrome.evaluate("window.__htj2k") or {}
        if probe.get("full"):
            break
    frames = [r for r in chrome.requests.values() if "/frames/" in r["url"]]
    row: dict[str, Any] = {
        "first_ms": probe.get("first", {}).get("t") if probe.get("first") else None,
        "first_quality": probe.get("first", {}).get("quality") if probe.get("first") else None,
        "full_ms": probe.get("full", {}).get("t") if probe.get("full") else None,
        "first_frame_request_ms": probe.get("firstFrameRequest"),
        "frame_requests_200": sum(1 for r in frames if r["status"] == 200),
        "frame_requests_206": sum(1 for r in frames if r["status"] == 206),
        "frame_requests_other": sum(1 for r in frames if r["status"] not in (200, 206)),
        "frame_bytes": sum(r["bytes"] for r in frames),
        "problems": chrome.problems()[:5],
        "frame_log": [[r["url"].split("/frames/", 1)[1], r["status"], r["bytes"], r["content_type"]] for r in frames],
    }
    start = row["first_frame_request_ms"]
    row["first_after_frames_ms"] = row["first_ms"] - start if row["first_ms"] is not None and start is not None else None
    row["full_after_frames_ms"] = row["full_ms"] - start if row["full_ms"] is not None and start is not None else None
    chrome.call("Page.navigate", url="about:blank")  # stop the previous page's prefetching before the next load
    time.sleep(1.0)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ohif-dist", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--xdsi-src", type=Path, default=ROOT)
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--stored", choices=("htj2k", "native"), default="htj2k", help="how the study is stored (native: frames re-encoded on the fly)")
    p.add_argument("--links", default="0,20,4", help="comma-separated links in Mbit/s for the frame answers (0: loopback, unthrottled)")
    p.add_argument("--latency", type=float, default=20.0, help="ms added to each frame answer on a paced link")
    p.add_argument("--chunk", type=int, default=65536, help="bytes of each frame the progressive first stage fetches")
    p.add_argument("--rounds", default="ABBA", help="order of the modes (A full frames, B progressive)")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--limit", type=float, default=120.0, help="longest wait for the full image, seconds")
    args = p.parse_args()
    if not (args.ohif_dist / "index.html").is_file():
        raise SystemExit(f"{args.ohif_dist}: no index.html; see bench/ohif_check.py's docstring for the npm command")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="htj2k-bench-"))
    xdsi = chrome = viewer = pacer = None
    results: list[dict[str, Any]] = []
    try:
        files = tmp / "study"
        files.mkdir()
        t0 = time.monotonic()
        study = make_study(files, args.instances, args.stored)
        paths = sorted(files.glob("*.dcm"))
        size = sum(p.stat().st_size for p in paths)
        print(f"{len(paths)} instances ({args.stored}, {size / 1e6:.1f} MB) made in {time.monotonic() - t0:.1f} s", flush=True)
        state: dict[str, Any] = {"config": {}, "upstream": None}
        viewer = viewer_server(args.ohif_dist, state)
        origin = f"http://127.0.0.1:{viewer.server_address[1]}"
        xdsi = Xdsi(args.xdsi_src.resolve(), tmp / "data", None)
        link_state = {"mbit": 0.0, "latency_ms": args.latency}
        pacer = pacing_proxy(xdsi.base, link_state)
        state["upstream"] = f"http://127.0.0.1:{pacer.server_address[1]}"
        stow_in_batches(xdsi.base, paths)
        chrome = Chromium(args.chromium, tmp / "chrome", 1400, 900, args.out / "chromium.log")
        chrome.call("Network.setCacheDisabled", cacheDisabled=True)
        chrome.call("Page.addScriptToEvaluateOnNewDocument", source=PROBE)
        url = f"{origin}/viewer?StudyInstanceUIDs={study}"
        modes = {"A": "full", "B": "progressive"}
        for link in [float(x) for x in args.links.split(",")]:
            link_state["mbit"] = link
            for k, letter in enumerate(args.rounds):
                mode = modes[letter]
                state["config"] = {"/app-config.js": progressive_config(f"{origin}/dicomweb", f"{origin}/wado", mode=mode, chunk=args.chunk,
                                                                        stored_native=args.stored == "native")}  # fmt: skip
                row = {"link_mbit": link, "round": k, "mode": mode, **measure(chrome, url, args.limit)}
                results.append(row)
                print(json.dumps(row), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "report.md").write_text(report(results, args, size) + "\n")
        print(report(results, args, size))
    finally:
        if chrome:
            chrome.close()
        for srv in (viewer, pacer):
            if srv:
                srv.shutdown()
                srv.server_close()
        if xdsi:
            xdsi.stop()
            shutil.copy(tmp / "xdsi-serve.log", args.out / "xdsi-serve.log")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: list[dict[str, Any]], args: argparse.Namespace, size: int) -> str:
    lines = [
        f"# OHIF first image, {args.instances} x 512x512 CT stored {args.stored} ({size / 1e6:.1f} MB), progressive vs full frames",
        "",
        "Links pace the frame answers only (the viewer and the metadata at loopback speed in both modes).",
        "",
        "| link | mode | runs | first image ms (from nav) | first image ms (from 1st frame request) | full-res ms (from 1st frame request) | first quality | frame req 200/206 | frame bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def med(rows: list[dict[str, Any]], key: str) -> str:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return f"{statistics.median(vals):.0f}" if vals else "-"

    for link in sorted({r["link_mbit"] for r in results}):
        for mode in ("full", "progressive"):
            rows = [r for r in results if r["link_mbit"] == link and r["mode"] == mode]
            if not rows:
                continue
            quality = ",".join(str(r["first_quality"]) for r in rows)
            reqs = ",".join(f"{r['frame_requests_200']}/{r['frame_requests_206']}" for r in rows)
            lines.append(
                f"| {'loopback' if not link else f'{link:g} Mbit/s + {args.latency:g} ms'} | {mode} | {len(rows)} | {med(rows, 'first_ms')} | {med(rows, 'first_after_frames_ms')}"
                f" | {med(rows, 'full_after_frames_ms')} | {quality} | {reqs} | {med(rows, 'frame_bytes')} |"
            )
    lines += ["", "Quality: Cornerstone's ImageQualityStatus (6 subresolution, 8 full resolution). Medians of the runs."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
