"""Security Alert for a configuration change between two starts of ``xdsi serve`` (issue 12, PS3.15 A.5.3.11).

xdsi reads its configuration once, at start, so "the configuration changed" means: the
effective settings (file, environment and flags together) differ from those of the previous
start.  A digest of each setting is kept in ``<data_dir>/audit/settings-digest.json`` (next to
the audit spool; like the spool it exists only when auditing is on) and compared at start.
Only SHA-256 digests are kept and only setting *names* go into the message: a password in
an index URL is neither written to the data dir nor sent to the repository.

One Security Alert per kind of change, with the EventTypeCode of PS3.16 CID 401:

* 110128 Network Configuration: where and as whom we listen and whom we call (host, ports,
  AE title, public URL, [peers], [partitions]);
* 110129 Security Configuration: [tls], [audit], CORS and the [dimse]/[http]/[limits] bounds on
  what a peer may cost;
* 110131 Software Configuration: everything else (storage, index, [xds], log level).

The first start with auditing on has nothing to compare with and records no alert (its
Application Start is on record); a start whose digest file cannot be read or written logs
why and goes on: the alert is evidence, not a reason to refuse to serve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from xdsi.audit import messages as m

__all__ = ["digests", "changed_settings", "configuration_changed", "KINDS"]

log = logging.getLogger(__name__)

NETWORK = {"host", "dicom_port", "http_port", "dicom_tls_port", "https_port", "ae_title", "public_url", "peers", "partitions"}
SECURITY = {"tls", "audit", "xua", "cors_origins", "dimse_limits", "http_limits", "limits", "max_associations", "dimse_timeout",
            "acse_timeout", "network_timeout", "dimse_policy", "auth"}
KINDS = ("network_configuration", "security_configuration", "software_configuration")


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else repr(o))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def digests(settings: Any) -> dict[str, str]:
    """SHA-256 per setting: ``tls.certificate``, ``peers.PACS``, ``host``... (one level into tables)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for sub in dataclasses.fields(value):
                v = getattr(value, sub.name)
                if f.name == "tls" and isinstance(v, Path):  # a renewed certificate or new CA bundle at the same path
                    v = [str(v), _file_digest(v)]
                out[f"{f.name}.{sub.name}"] = _digest(v)
        elif isinstance(value, Mapping):
            for key in value:
                out[f"{f.name}.{key}"] = _digest(value[key])
            out[f"{f.name}"] = _digest(sorted(str(k) for k in value))  # the set of entries itself
        else:
            out[f.name] = _digest(value)
    return out


def kind_of(name: str) -> str:
    top = name.split(".", 1)[0]
    if top in NETWORK:
        return "network_configuration"
    if top in SECURITY:
        return "security_configuration"
    return "software_configuration"


def changed_settings(before: Mapping[str, str], now: Mapping[str, str]) -> dict[str, list[str]]:
    """Kind -> sorted names of the settings added, removed or changed since ``before``."""
    out: dict[str, list[str]] = {}
    for name in sorted(set(before) | set(now)):
        if before.get(name) != now.get(name):
            out.setdefault(kind_of(name), []).append(name)
    return out


def digest_path(settings: Any) -> Path:
    return (settings.data_dir / "audit" / "settings-digest.json").resolve()


def configuration_changed(trail: Any, settings: Any, reporter: m.Participant) -> None:
    """At start: compare the settings with the previous start's, record the alerts, keep the new digests; never raises."""
    if trail is None or not trail.enabled:
        return
    path = digest_path(settings)
    try:
        now = digests(settings)
        before: dict[str, str] | None = None
        if path.exists():
            before = json.loads(path.read_text(encoding="utf-8"))
        if before is not None:
            for kind, names in changed_settings(before, now).items():
                shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
                why = f"settings changed since the previous start of xdsi serve: {shown}"
                trail.record(m.security_alert(trail.source, reporter, kind, f"xdsi-settings:{settings.data_dir.resolve()}", why, outcome="0"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(now, sort_keys=True, indent=0), encoding="utf-8")
        os.replace(tmp, path)
    except Exception:
        log.exception("audit: the configuration could not be compared with the previous start's (%s)", path)
