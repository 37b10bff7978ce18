"""STOW-RS for tests: Part 10 files posted as one multipart/related request, the way a DICOMweb client does."""

from __future__ import annotations

import uuid

import requests

from tests.support.server import XdsiProcess


def stow_raw(server: XdsiProcess, files: list[bytes], study: str | None = None, partition: str | None = None,
             ctype: str = "application/dicom", timeout: float = 60) -> requests.Response:
    """POST ``files`` to ``/dicomweb[/partition]/studies[/study]``; the response, whatever its status."""
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + f + b"\r\n" for f in files)
    body += f"--{boundary}--\r\n".encode()
    path = "/dicomweb" + (f"/{partition}" if partition else "") + "/studies" + (f"/{study}" if study else "")
    return requests.post(
        f"http://{server.host}:{server.http_port}{path}",
        data=body,
        headers={"Content-Type": f'multipart/related; type="{ctype}"; boundary={boundary}', "Accept": "application/dicom+json"},
        timeout=timeout,
    )
