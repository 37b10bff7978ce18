"""Where the official IHE / OASIS / DICOM reference files are: ``shared/standards`` beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
_CANDIDATES = [
    Path(os.environ["XDSI_STANDARDS"]) if os.environ.get("XDSI_STANDARDS") else None,
    _REPO.parent / "shared" / "standards",
    Path("/work/shared/standards"),
]


def _find() -> Path:
    for p in _CANDIDATES:
        if p is not None and (p / "ihe" / "schema").is_dir():
            return p
    raise RuntimeError(
        "the official schemas (shared/standards) were not found beside the checkout; set XDSI_STANDARDS to their folder"
    )


STANDARDS = _find()
