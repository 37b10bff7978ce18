"""Colour ultrasound and multi-frame objects in a real viewer: OHIF 3 in headless Chromium against ``xdsi serve``.

Viewers ask for ``transfer-syntax=*`` frames and draw what they get, so the only honest check of
colour handling is a real viewer in a real browser.  This script stores pydicom's bundled colour
ultrasound and multi-frame test files (files nobody on this project wrote) in a fresh ``xdsi serve``,
opens each study in OHIF's prebuilt viewer in headless Chromium, and writes to ``--out``:

* ``NN_name.png`` (first frame as OHIF draws it) and, for multi-frame objects, ``NN_name_scrolled.png``
  after scrolling the mouse wheel (the overlay at bottom right says which frame, e.g. ``(13/30)``);
* ``NN_name_pydicom_frameK.png``: pydicom's own decode of the same frames (colour as RGB, palette
  applied, grey stretched to 0..255), the reference to compare with;
* ``report.md``: per study, every DICOMweb request the viewer made and what xdsi answered (status,
  Content-Type of the response and of its first part, bytes), and browser console errors;
  ``traffic.json`` the same rows; ``xdsi-serve.log``, ``chromium.log``.

It judges nothing by itself (the viewer applies its own window and interpolation, so pixels are not
compared): look at the screenshots next to pydicom's decode (right colours, or teal false colour?
the frame counter moving, the frame matching?).

Installs nothing.  Once, by hand:

    apt-get update && apt-get install -y chromium            # Debian's Chromium, /usr/bin/chromium
    mkdir -p /tmp/ohif && cd /tmp/ohif
    npm pack @ohif/app@3.13.2 && tar xzf ohif-app-3.13.2.tgz  # OHIF's built viewer: package/dist

Run (from the repository, with its virtualenv):

    .venv/bin/python bench/ohif_check.py --ohif-dist /tmp/ohif/package/dist --out /tmp/ohif-shots/after
    .venv/bin/python bench/ohif_check.py ... --xdsi-src /path/to/other/checkout   # that tree's xdsi serves

How the browser reaches xdsi (``--mode``):

* ``proxy`` (default): one origin.  A small Python server serves OHIF's static ``dist`` and
  forwards ``/dicomweb`` and ``/wado`` to xdsi; the viewer needs no CORS.  The proxy passes method,
  path, query, Accept and body through unchanged and returns xdsi's status, headers and body as they
  are (buffered per response: the test objects are small), so what the viewer draws is what xdsi
  sent.
* ``cors``: OHIF on its own origin talks to xdsi directly; xdsi is started with
  ``[http] cors_origins`` naming the viewer's origin (needs a tree with the CORS setting).

Chromium is driven over the DevTools protocol with a minimal stdlib WebSocket client (no
Playwright download): navigate, wait until the viewer has stopped asking xdsi for anything, take
a screenshot; for multi-frame objects, scroll the mouse wheel over the viewport and take a second.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import http.server
import io
import itertools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (pydicom test file, what it is): colour ultrasound in every encoding pydicom ships, and multi-frame
OBJECTS = [
    ("examples_ybr_color.dcm", "US multi-frame, 30 frames, YBR_FULL_422, JPEG Baseline"),
    ("examples_jpeg2k.dcm", "US, YBR_RCT, JPEG 2000 lossless"),
    ("examples_rgb_color.dcm", "US, RGB, Explicit VR LE (uncompressed control)"),
    ("examples_palette.dcm", "US, PALETTE COLOR, Explicit VR LE"),
    ("ExplVR_BigEnd.dcm", "US, RGB, Explicit VR Big Endian"),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "SC, YBR_FULL_422, JPEG Baseline"),
    ("SC_rgb_rle_2frame.dcm", "SC multi-frame, 2 frames, RGB, RLE Lossless"),
]


# -- the objects --------------------------------------------------------------------------------

def prepare(tmp: Path) -> list[dict[str, Any]]:
    """Each test file as its own study (new Study/Series/SOP UIDs, a patient name saying what it is).

    Pixel Data and the transfer syntax are left exactly as pydicom's file has them.
    """
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    out = []
    for i, (name, what) in enumerate(OBJECTS, start=1):
        src = get_testdata_file(name, download=False)
        if src is None:
            print(f"skip {name}: not among pydicom's bundled test files", file=sys.stderr)
            continue
        ds = dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = f"OHIF{i:02d}^{Path(name).stem}"
        ds.PatientID = f"OHIF{i:02d}"
        ds.StudyDescription = what[:64]
        ds.SeriesDescription = name[:64]
        ds.StudyDate = ds.get("StudyDate") or "20240101"
        ds.Modality = ds.get("Modality") or "OT"
        path = tmp / f"{i:02d}_{Path(name).stem}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(
            dict(
                n=i, name=name, what=what, path=path, study=ds.StudyInstanceUID,
                frames=int(ds.get("NumberOfFrames") or 1), ts=str(ds.file_meta.TransferSyntaxUID),
                photometric=str(ds.get("PhotometricInterpretation", "")),
            )
        )
    return out


def stow(base: str, paths: list[Path]) -> None:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in paths)
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        f"{base}/dicomweb/studies", data=body, method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "Accept": "application/dicom+json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        answer = json.loads(r.read() or b"{}")
    failed = answer.get("00081198", {}).get("Value", [])
    if failed:
        raise SystemExit(f"STOW-RS refused {len(failed)} instance(s): {json.dumps(failed)[:500]}")


def reference(path: Path, index: int, out: Path) -> None:
    """pydicom's own decode of frame ``index`` as an 8-bit RGB/grey PNG: what the viewer should show (before windowing)."""
    import numpy as np
    from PIL import Image
    from pydicom import dcmread
    from pydicom.pixels import apply_color_lut, pixel_array

    ds = dcmread(path)
    arr = pixel_array(ds, index=index)  # colour as RGB (YBR converted), as pydicom does by default
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    arr = arr.astype(np.float64)
    if ds.get("RescaleSlope") is not None:
        arr = arr * float(ds.RescaleSlope) + float(ds.get("RescaleIntercept", 0))
    bits = 8 if ds.PhotometricInterpretation == "PALETTE COLOR" and arr.max() <= 255 else None
    if arr.ndim == 2 or bits is None:  # grey, or deeper than 8 bits: full range to 0..255
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo or 1.0))
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        arr = 255 - arr
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(out)


# -- xdsi serve ---------------------------------------------------------------------------------

def _free_port() -> int:
    """A loopback TCP port free at the time of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Xdsi:
    """``xdsi serve`` from ``src`` on 127.0.0.1, on ports free when asked, stopped by SIGTERM.

    (A port of 0 switches a listener off, it does not ask the OS for one.)
    """

    def __init__(self, src: Path, data: Path, cors_origin: str | None) -> None:
        cfg = data.parent / "xdsi.toml"
        text = f'[server]\ndata_dir = "{data}"\nhost = "127.0.0.1"\ndicom_port = {_free_port()}\nhttp_port = {_free_port()}\n'
        if cors_origin:
            text += f'\n[http]\ncors_origins = ["{cors_origin}"]\n'
        cfg.write_text(text)
        env = dict(os.environ, PYTHONPATH=str(src))
        self.log = open(data.parent / "xdsi-serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xdsi", "serve", "--config", str(cfg)],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=src,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            self.stop()
            raise SystemExit(f"xdsi serve did not start (see {self.log.name}): {line!r}")
        self.base = f"http://127.0.0.1:{m.group(1)}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# -- the viewer's origin: OHIF's static files, and (proxy mode) xdsi under the same origin -------

TYPES = {".js": "application/javascript", ".wasm": "application/wasm", ".css": "text/css", ".html": "text/html",
         ".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
         ".woff2": "font/woff2", ".woff": "font/woff", ".ttf": "font/ttf", ".txt": "text/plain", ".map": "application/json"}
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization", "proxy-authenticate"}


def viewer_server(dist: Path, state: dict[str, Any]) -> http.server.ThreadingHTTPServer:
    """OHIF's files; ``state["config"]``: generated files by path; ``state["upstream"]``: xdsi to proxy to, or None.

    Started before xdsi (whose CORS setting needs the viewer's origin); ``state`` is filled in after.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:  # quiet: the browser's own network log is the record
            pass

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP and k.lower() != "host"}
            conn = http.client.HTTPConnection(state["upstream"].split("//", 1)[1], timeout=300)
            conn.request(self.command, self.path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            conn.close()
            self.send_response(r.status, r.reason)
            for k, v in r.getheaders():
                if k.lower() not in HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)


        def _static(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in state["config"]:
                data, ctype = state["config"][path].encode(), "application/javascript"
            else:
                f = (dist / path.lstrip("/")).resolve()
                if dist.resolve() not in f.parents or not f.is_file():
                    f = dist / "index.html"  # a single-page app: /viewer?... is the index
                data, ctype = f.read_bytes(), TYPES.get(f.suffix, "application/octet-stream")
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")  # SharedArrayBuffer for OHIF's decoders
            self.send_header("Cross-Origin-Embedder-Policy", "credentialless" if not state["upstream"] else "require-corp")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _any(self) -> None:
            if state["upstream"] and (self.path.startswith("/dicomweb") or self.path.startswith("/wado")):
                self._proxy()
            else:
                self._static()

        do_GET = do_HEAD = do_POST = do_OPTIONS = _any  # noqa: N815

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="viewer", daemon=True).start()
    return server


def first_part_type(ctype: str, body: bytes) -> str:
    """The Content-Type of a multipart answer's first part: what the viewer is told the frame bytes are."""
    if not ctype.startswith("multipart/"):
        return ""
    head = body[: body.find(b"\r\n\r\n", body.find(b"--")) + 1].decode("latin-1")
    m = re.search(r"(?im)^content-type:\s*(.+?)\s*$", head)
    return m.group(1) if m else "?"


def ohif_config(dicomweb: str, wado: str) -> str:
    """OHIF's app-config.js: one DICOMweb data source, xdsi."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "xdsi",
        "configuration": {
            "friendlyName": "xdsi", "name": "xdsi",
            "wadoUriRoot": wado, "qidoRoot": dicomweb, "wadoRoot": dicomweb,
            "qidoSupportsIncludeField": False, "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True, "supportsFuzzyMatching": True, "supportsWildcard": True,
            "staticWado": False, "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/", "extensions": [], "modes": [], "customizationService": {}, "showStudyList": True,
        "maxNumberOfWebWorkers": 2, "showWarningMessageForCrossOrigin": False, "showCPUFallbackMessage": False,
        "showLoadingIndicator": True, "strictZSpacingForVolumeViewport": True, "defaultDataSourceName": "xdsi",
        "showErrorDetails": "always", "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


# -- Chromium over the DevTools protocol --------------------------------------------------------

class WebSocket:
    """Just enough RFC 6455 for the DevTools protocol: masked text frames out, (fragmented) frames in."""

    def __init__(self, url: str) -> None:
        m = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        assert m, url
        self.sock = socket.create_connection((m.group(1), int(m.group(2))), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {m.group(3)} HTTP/1.1\r\nHost: {m.group(1)}:{m.group(2)}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))

    def _exact(self, n: int) -> bytes:
        buf = io.BytesIO()
        while buf.tell() < n:
            chunk = self.sock.recv(min(n - buf.tell(), 1 << 20))
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            buf.write(chunk)
        return buf.getvalue()

    def send(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            data = self._exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode in (0x9, 0xA):  # ping/pong: Chromium does not ping; ignore
                continue
            parts.append(data)
            if b0 & 0x80:
                return b"".join(parts).decode()


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile: Path, width: int, height: int, log: Path) -> None:
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", f"--window-size={width},{height}",
             "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-crash-reporter", "--disable-breakpad",
             "about:blank"],
            stdout=self.log, stderr=subprocess.PIPE, text=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise SystemExit(f"Chromium did not start ({log})")
            time.sleep(0.2)
        port = port_file.read_text().splitlines()[0]
        threading.Thread(target=self._drain, daemon=True).start()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws = WebSocket(page["webSocketDebuggerUrl"])
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.requests: dict[str, dict[str, Any]] = {}  # DevTools requestId -> what was asked and answered
        self.last_net = time.monotonic()
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.write(line)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        m, p = msg["method"], msg.get("params", {})
        if not m.startswith("Network."):
            self.events.append(msg)
            return
        self.last_net = time.monotonic()
        rid = p.get("requestId", "")
        if m == "Network.requestWillBeSent":
            req = p["request"]
            headers = {k.lower(): v for k, v in req.get("headers", {}).items()}
            self.requests[rid] = dict(method=req["method"], url=req["url"], accept=headers.get("accept", ""), done=False,
                                      status=0, content_type="", bytes=0)
        elif rid in self.requests:
            row = self.requests[rid]
            if m == "Network.responseReceived":
                r = p["response"]
                headers = {k.lower(): v for k, v in r.get("headers", {}).items()}
                row.update(status=r["status"], content_type=headers.get("content-type", r.get("mimeType", "")))
            elif m in ("Network.loadingFinished", "Network.loadingFailed"):
                row.update(done=True, bytes=int(p.get("encodedDataLength", 0)), failed=p.get("errorText", ""))

    def busy(self) -> int:
        return sum(1 for r in self.requests.values() if not r["done"])

    def body(self, rid: str) -> bytes:
        try:
            r = self.call("Network.getResponseBody", requestId=rid)
        except RuntimeError:
            return b""
        return base64.b64decode(r["body"]) if r.get("base64Encoded") else r["body"].encode("latin-1", "replace")

    def dicomweb_rows(self, base: str) -> list[dict[str, Any]]:
        """The page's requests to xdsi (``base``), with the first multipart part's Content-Type; then forgets them."""
        rows = []
        for rid, r in self.requests.items():
            if r["url"].startswith((f"{base}/dicomweb", f"{base}/wado")) and r["method"] != "OPTIONS":
                part = first_part_type(r["content_type"], self.body(rid)) if r["content_type"].startswith("multipart/") else ""
                rows.append(dict(method=r["method"], path=r["url"][len(base):], accept=r["accept"], status=r["status"],
                                 content_type=r["content_type"], part_type=part, bytes=r["bytes"], failed=r.get("failed", "")))
        self.requests.clear()
        return rows

    def problems(self) -> list[str]:
        """Console errors and uncaught exceptions since the last call."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", ""))[:300])
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning"):
                out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description", "")))[:200] for a in p.get("args", [])))
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", "")[:300] + " " + p["entry"].get("url", ""))
        self.events.clear()
        return out

    def evaluate(self, expr: str) -> Any:
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True).get("result", {}).get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def wheel(self, x: float, y: float, delta: float) -> None:
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        self.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=delta)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def settle(chrome: Chromium, quiet: float, limit: float) -> None:
    """Wait until the page has had no request in flight and no network event for ``quiet`` seconds (at most ``limit``)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        time.sleep(0.5)
        chrome.call("Runtime.evaluate", expression="1")  # lets queued DevTools events arrive
        now = time.monotonic()
        if now - start >= quiet and now - chrome.last_net >= quiet and not chrome.busy():
            break
    time.sleep(1.5)  # the last frame's decode and draw


DISMISS = """(() => {
  let n = 0;
  for (const el of document.querySelectorAll('button, a, span')) {
    const t = (el.textContent || '').trim();
    if ((t === 'Skip all' || t === 'Confirm and hide') && el.offsetParent !== null) { el.click(); n++; }
  }
  return n;
})()"""  # OHIF's guided tour and "investigational use" banner would cover the image and its frame counter

VIEWPORT_CENTRE = """(() => {
  const els = [...document.querySelectorAll('canvas')].map(c => c.getBoundingClientRect()).filter(r => r.width > 200 && r.height > 200);
  if (!els.length) return null;
  const r = els.sort((a, b) => b.width * b.height - a.width * a.height)[0];
  return [r.left + r.width / 2, r.top + r.height / 2];
})()"""


# -- the check ----------------------------------------------------------------------------------

def summarise(rows: list[dict[str, Any]]) -> list[str]:
    """One line per kind of request (path with UIDs elided, Accept, status, Content-Type): count and bytes."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for r in rows:
        path = re.sub(r"\d+(\.\d+){3,}", "{uid}", r["path"].split("?", 1)[0])
        path = re.sub(r"/frames/[\d,]+", "/frames/{n}", path)
        ctype = re.sub(r";\s*boundary=[^;]+", "", r["content_type"]) + (f" [part: {r['part_type']}]" if r.get("part_type") else "")
        key = (r["method"], path, r["accept"], str(r["status"]), ctype)
        g = groups.setdefault(key, [0, 0])
        g[0] += 1
        g[1] += r["bytes"]
    return [f"{n:4d}× {m} {p}  Accept: {a or '-'}  -> {s} {ct or '-'}  ({b} bytes on the wire)" for (m, p, a, s, ct), (n, b) in groups.items()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ohif-dist", type=Path, required=True, help="OHIF's built viewer (npm @ohif/app: package/dist)")
    p.add_argument("--out", type=Path, required=True, help="folder for screenshots and report.md (created)")
    p.add_argument("--xdsi-src", type=Path, default=ROOT, help="source tree whose xdsi serves (first on PYTHONPATH; default this one)")
    p.add_argument("--mode", choices=("proxy", "cors"), default="proxy", help="same-origin proxy (default) or cross-origin with [http] cors_origins")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--size", default="1400x900", help="window size, WIDTHxHEIGHT")
    p.add_argument("--quiet", type=float, default=4.0, help="seconds without a request before a screenshot")
    p.add_argument("--limit", type=float, default=90.0, help="longest wait per page, seconds")
    p.add_argument("--only", action="append", default=[], metavar="FILE", help="only these pydicom test files (repeat)")
    args = p.parse_args()
    width, height = map(int, args.size.split("x"))
    if not (args.ohif_dist / "index.html").is_file():
        raise SystemExit(f"{args.ohif_dist}: no index.html; see this script's docstring for the npm command")
    if args.only:
        OBJECTS[:] = [o for o in OBJECTS if o[0] in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ohif-check-"))
    xdsi = chrome = viewer = None
    report = [f"# OHIF check: xdsi from {args.xdsi_src.resolve()} ({_git(args.xdsi_src)}), mode {args.mode}", ""]
    try:
        objects = prepare(tmp)
        traffic: list[dict[str, Any]] = []  # every DICOMweb request of every page, for traffic.json
        # the viewer's port first: in cors mode xdsi must be told the origin
        state: dict[str, Any] = {"config": {}, "upstream": None}
        viewer = viewer_server(args.ohif_dist, state)
        origin = f"http://127.0.0.1:{viewer.server_address[1]}"
        xdsi = Xdsi(args.xdsi_src.resolve(), tmp / "data", origin if args.mode == "cors" else None)
        base = origin if args.mode == "proxy" else xdsi.base
        state["config"] = {"/app-config.js": ohif_config(f"{base}/dicomweb", f"{base}/wado")}
        state["upstream"] = xdsi.base if args.mode == "proxy" else None
        stow(xdsi.base, [o["path"] for o in objects])
        print(f"xdsi {xdsi.base}, viewer {origin}, {len(objects)} studies stored; scratch {tmp}", flush=True)
        chrome = Chromium(args.chromium, tmp / "chrome", width, height, args.out / "chromium.log")

        chrome.call("Page.navigate", url=f"{origin}/")
        settle(chrome, args.quiet, args.limit)
        chrome.evaluate(DISMISS)
        time.sleep(1.0)
        chrome.screenshot(args.out / "00_study_list.png")
        chrome.requests.clear()
        report += ["## Study list", "", "![](00_study_list.png)", "", *[f"    {x}" for x in chrome.problems()], ""]

        for o in objects:
            chrome.requests.clear()
            url = f"{origin}/viewer?StudyInstanceUIDs={o['study']}"
            chrome.call("Page.navigate", url=url)
            settle(chrome, args.quiet, args.limit)
            if chrome.evaluate(DISMISS):
                time.sleep(1.0)
            stem = f"{o['n']:02d}_{Path(o['name']).stem}"
            reference(o["path"], 0, args.out / f"{stem}_pydicom_frame1.png")
            shot = f"{stem}.png"
            chrome.screenshot(args.out / shot)
            shots = [shot]
            if o["frames"] > 1:
                centre = chrome.evaluate(VIEWPORT_CENTRE)
                if centre:
                    for _ in range(min(o["frames"] - 1, 12)):
                        chrome.wheel(centre[0], centre[1], 120)
                        time.sleep(0.3)
                    settle(chrome, 2.0, 30)
                    chrome.evaluate(DISMISS)
                    later = f"{stem}_scrolled.png"
                    chrome.screenshot(args.out / later)
                    shots.append(later)
                    # OHIF's overlay says which frame it shows ("I: 13 (13/30)"): the reference follows it
                    m = re.search(r"(\d+)\s*/\s*%d\b" % o["frames"], chrome.evaluate("document.body.innerText") or "")
                    frame = int(m.group(1)) if m else None
                    if frame:
                        reference(o["path"], frame - 1, args.out / f"{stem}_pydicom_frame{frame}.png")
                        shots.append(f"{stem}_pydicom_frame{frame}.png")
            rows = chrome.dicomweb_rows(base)
            traffic.extend(rows)
            report += [f"## {o['n']:02d} {o['name']}: {o['what']}", "",
                       f"stored transfer syntax {o['ts']}, {o['photometric']}, {o['frames']} frame(s); {url}", ""]
            report += [f"![]({s})" for s in [f"{stem}_pydicom_frame1.png", *shots]] + ["", "DICOMweb requests the viewer made (xdsi's answers):", ""]
            report += [f"    {line}" for line in summarise(rows)] + [""]
            problems = chrome.problems()
            if problems:
                report += ["Browser console errors:", ""] + [f"    {x}" for x in problems[:20]] + [""]
            print(f"{shot}: {len(rows)} request(s), {len(problems)} console error(s)", flush=True)
        (args.out / "traffic.json").write_text(json.dumps(traffic, indent=1))
    finally:
        if chrome:
            chrome.close()
        if viewer:
            viewer.shutdown()
            viewer.server_close()
        if xdsi:
            xdsi.stop()
            shutil.copy(tmp / "xdsi-serve.log", args.out / "xdsi-serve.log")
        (args.out / "report.md").write_text("\n".join(report) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"screenshots and report.md in {args.out}")
    return 0


def _git(src: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h %s"], capture_output=True, text=True, timeout=10).stdout.strip()[:100]
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
