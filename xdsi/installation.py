"""Per-installation identifiers, generated once and kept in the data directory.

Why: every install used to answer to the same ``repository_unique_id`` (NIST's
IDS test OID, later one fixed 2.25 OID) and sent the same sourceId and author
OIDs.  Two sites registering in one affinity domain then claimed to be the same
repository, and a consumer's RAD-69 for one could be routed to the other.  An
identifier that is not configured is now generated the first time the data
directory is opened (a 2.25 UUID-derived OID, ITU-T X.667) and read back on
every later start, so it is unique to the installation and stable across
restarts; ``xdsi status`` prints it so it can be registered with the domain.

The file is created once, atomically (written aside, then hard-linked into
place, which fails if another process won the race), and never rewritten: a
damaged or unreadable file stops the start with a clear error instead of
silently minting a new repository id that would orphan every published
manifest.
"""

from __future__ import annotations

import logging
import os
import tomllib
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from pydicom.uid import generate_uid

from xdsi.config import ConfigError, Settings, XdsSettings
from xdsi.uids import is_valid_uid

__all__ = ["FILE_NAME", "InstallationError", "InstallationIds", "load", "load_or_create", "resolve", "new_uid_under"]

log = logging.getLogger(__name__)

FILE_NAME = "installation.toml"

# arcs under the generated root; fixed so that an id can be told from another by its last arc
_ARCS = {"repository_unique_id": 1, "source_id": 2, "uid_root": 3, "accession_authority": 4, "institution_oid": 5}


class InstallationError(ConfigError):
    """The installation file exists but cannot be used; regenerating it would change our identity."""


@dataclass(frozen=True)
class InstallationIds:
    """The identifiers of one installation; each ``root.N`` for the arcs in ``_ARCS``."""

    root: str
    created: str

    def arc(self, name: str) -> str:
        return f"{self.root}.{_ARCS[name]}"

    @property
    def repository_unique_id(self) -> str:
        return self.arc("repository_unique_id")

    @property
    def source_id(self) -> str:
        return self.arc("source_id")

    @property
    def uid_root(self) -> str:
        return self.arc("uid_root")

    @property
    def accession_authority(self) -> str:
        return self.arc("accession_authority")

    @property
    def institution_oid(self) -> str:
        return self.arc("institution_oid")

    def text(self) -> str:
        lines = [
            "# Generated once by xdsi for this installation: keep it with the data (backups, moves).",
            "# Changing it changes the repositoryUniqueId every published manifest points at.",
            "# Values configured in [xds] take precedence over the ones derived from this root.",
            f'root = "{self.root}"',
            f'created = "{self.created}"',
            "# derived (for reference; only root is read back):",
        ]
        lines += [f'# {name} = "{self.arc(name)}"' for name in _ARCS]
        return "\n".join(lines) + "\n"


def _generate() -> InstallationIds:
    # 2.25.<UUID as integer>: at most 44 characters, leaving room for the arcs and a UID suffix
    return InstallationIds(f"2.25.{uuid.uuid4().int}", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def load(data_dir: Path) -> InstallationIds | None:
    """The stored identifiers of ``data_dir``, or None if none were generated yet; raises if the file is damaged."""
    path = Path(data_dir) / FILE_NAME
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InstallationError(f"{path}: cannot read the installation identifiers ({exc}); restore it from a backup") from None
    root = doc.get("root")
    if not isinstance(root, str) or not root.startswith("2.25.") or not is_valid_uid(root) or len(root) > 44:
        raise InstallationError(f"{path}: root {root!r} is not a 2.25 UUID-derived OID; restore the file from a backup")
    return InstallationIds(root, str(doc.get("created", "")))


def load_or_create(data_dir: Path) -> InstallationIds:
    """The identifiers of ``data_dir``, generated and stored on first use (safe against a concurrent first use)."""
    data_dir = Path(data_dir)
    found = load(data_dir)
    if found is not None:
        return found
    data_dir.mkdir(parents=True, exist_ok=True)
    ids = _generate()
    final = data_dir / FILE_NAME
    tmp = data_dir / f".{FILE_NAME}.{os.getpid()}.{uuid.uuid4().hex}"
    try:
        with tmp.open("x", encoding="ascii") as fh:
            fh.write(ids.text())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, final)  # atomic, and fails if another process created it first
        except FileExistsError:
            pass
        else:
            log.debug("generated the identifiers of this installation in %s: repositoryUniqueId %s, sourceId %s",
                        final, ids.repository_unique_id, ids.source_id)
    finally:
        tmp.unlink(missing_ok=True)
    stored = load(data_dir)
    assert stored is not None
    return stored


def generated_fields(x: XdsSettings) -> list[str]:
    """The ``[xds]`` identifier settings left empty, to be filled from the installation root."""
    return [name for name in ("repository_unique_id", "source_id", "uid_root", "accession_authority") if not getattr(x, name)]


def resolve(settings: Settings) -> Settings:
    """``settings`` with every unconfigured identifier taken from the installation file of its data dir.

    Idempotent: settings whose identifiers are all set are returned as they are
    (a partition inherits the main archive's resolved identifiers).
    """
    x = settings.xds
    missing = generated_fields(x)
    if not missing and x.author_institution is not None:
        return settings
    ids = load_or_create(settings.data_dir)
    fill = {name: ids.arc(name) for name in missing}
    if x.author_institution is None:
        fill["author_institution"] = f"xdsi^^^^^^^^^{ids.institution_oid}"
    return replace(settings, xds=replace(x, **fill))


def new_uid_under(root: str) -> str:
    """A new UID under ``root`` (pydicom fills the remaining digits of the 64 with random ones)."""
    prefix = root.rstrip(".") + "."
    if len(prefix) > 50:  # fewer than 14 random digits left: not unique enough; use a bare 2.25 UID
        return f"2.25.{uuid.uuid4().int}"
    return str(generate_uid(prefix=prefix))
