"""An in-process ``DicomServer`` for tests that reach into it, with what it sets process-wide put back afterwards.

``DicomServer`` sets pynetdicom's ``_config`` switches (chunked data sets, log levels) and the spool
directory (``tempfile.tempdir``) for the whole process: a test module that starts one must leave them as
it found them for the modules after it.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from xdsi.archive import Archive

_PROCESS_WIDE = ("STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET", "LOG_HANDLER_LEVEL", "LOG_RESPONSE_IDENTIFIERS")


@contextmanager
def inprocess_dicom(archive: Archive) -> Iterator[Any]:
    """A started ``DicomServer`` on 127.0.0.1 (an ephemeral port) for ``archive``; stopped, and the process put back."""
    from pynetdicom import _config

    from xdsi.dimse.server import DicomServer

    saved = {k: getattr(_config, k) for k in _PROCESS_WIDE}, tempfile.tempdir
    dicom = DicomServer(archive)
    dicom.start("127.0.0.1", 0)
    try:
        yield dicom
    finally:
        dicom.stop()
        for k, v in saved[0].items():
            setattr(_config, k, v)
        tempfile.tempdir = saved[1]
