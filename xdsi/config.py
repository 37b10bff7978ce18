"""One typed settings object for the whole process.

Settings come from three places, later ones winning: the embedded defaults,
a TOML file (``--config``), ``XDSI_*`` environment variables, and finally
command-line flags.  They are read once at start-up and passed down; nothing
below the CLI reads the environment or a file on its own, so a test can build
a :class:`Settings` in memory and get exactly the behaviour it asked for.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "Peer",
    "TierSettings",
    "StorageSettings",
    "XdsSettings",
    "Settings",
    "load_settings",
    "parse_size",
]

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: no backslash, no control chars


class ConfigError(ValueError):
    """A configuration value that the archive cannot run with."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1}
for _i, _p in enumerate("KMGTP", start=1):
    _UNITS[f"{_p}B"] = 1000**_i
    _UNITS[f"{_p}"] = 1000**_i
    _UNITS[f"{_p}IB"] = 1024**_i
    _UNITS[f"{_p}I"] = 1024**_i


def parse_size(value: int | str | None) -> int | None:
    """Parse ``"500 GB"``, ``"2GiB"`` or an integer byte count."""
    if value is None or isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"not a size: {value!r}")
    unit = (m.group(2) or "").upper()
    if unit not in _UNITS:
        raise ConfigError(f"unknown size unit in {value!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def validate_ae_title(aet: str, what: str = "AE title") -> str:
    aet = aet.strip()
    if not AE_TITLE_RE.match(aet):
        raise ConfigError(f"{what} {aet!r} is not a valid DICOM AE title (1-16 printable characters, no backslash)")
    return aet


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity we may open associations to (C-MOVE destination, commitment requester)."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class TierSettings:
    """One storage tier: a directory, ordered fastest first.

    ``migrate_after_days``: studies not read for this long move to the next tier.
    ``high_watermark``/``low_watermark``: when the bytes stored on this tier pass
    the high mark, least-recently-read studies move down until it is under the low mark.
    """

    name: str
    path: Path
    migrate_after_days: float | None = None
    high_watermark: int | None = None
    low_watermark: int | None = None


@dataclass(frozen=True)
class StorageSettings:
    tiers: tuple[TierSettings, ...]
    duplicate_policy: str = "keep"  # "keep" the first copy, or "replace" it
    recall_on_read: bool = True  # copy an instance read from a cold tier back to the hot tier


@dataclass(frozen=True)
class XdsSettings:
    """The ``[xds]`` table: identity of this Imaging Document Source in the XDS affinity domain.

    ``repository_unique_id`` is what consumers put in RAD-69 RepositoryUniqueId and what
    manifests carry as Retrieve Location UID.  More XDS fields are added here, not elsewhere.
    """

    repository_unique_id: str = "2.25.174983427195862233712418339462367446029"  # = xdsconst.DEFAULT_REPOSITORY_UNIQUE_ID


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("xdsi-data")
    host: str = "127.0.0.1"
    dicom_port: int = 11112
    http_port: int = 8080
    ae_title: str = "XDSI"
    index_url: str | None = None  # None: sqlite file under data_dir
    storage: StorageSettings | None = None  # None: one tier "cache" under data_dir
    peers: Mapping[str, Peer] = field(default_factory=dict)
    # DIMSE tuning
    dimse_timeout: float = 60.0
    acse_timeout: float = 30.0
    network_timeout: float = 60.0
    max_associations: int = 32
    log_level: str = "INFO"
    xds: XdsSettings = field(default_factory=XdsSettings)

    # -- derived values, so that callers never re-implement the defaults --
    @property
    def effective_index_url(self) -> str:
        if self.index_url:
            return self.index_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"

    @property
    def effective_storage(self) -> StorageSettings:
        if self.storage is not None:
            return self.storage
        return StorageSettings(tiers=(TierSettings(name="cache", path=(self.data_dir / "storage" / "cache").resolve()),))

    @property
    def temp_dir(self) -> Path:
        """Where incoming C-STORE datasets are spooled; on the data disk so a rename can place them."""
        return (self.data_dir / "tmp").resolve()

    def peer(self, ae_title: str) -> Peer | None:
        return self.peers.get(ae_title.strip())

    def with_overrides(self, **kw: Any) -> "Settings":
        """Apply command-line flags; ``None`` means "not given"."""
        return _validated(replace(self, **{k: v for k, v in kw.items() if v is not None}))


def _tier_from(raw: Mapping[str, Any], base: Path) -> TierSettings:
    unknown = set(raw) - {"name", "path", "migrate_after_days", "high_watermark", "low_watermark"}
    if unknown:
        raise ConfigError(f"unknown key(s) in [[storage.tiers]]: {', '.join(sorted(unknown))}")
    try:
        name = str(raw["name"])
        path = Path(str(raw["path"]))
    except KeyError as exc:
        raise ConfigError(f"[[storage.tiers]] needs {exc.args[0]!r}") from None
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"tier name {name!r}: use letters, digits, '_', '-', '.'")
    if not path.is_absolute():
        path = base / path
    high = parse_size(raw.get("high_watermark"))
    low = parse_size(raw.get("low_watermark"))
    if (high is None) != (low is None):
        raise ConfigError(f"tier {name}: give both high_watermark and low_watermark, or neither")
    if high is not None and low is not None and low > high:
        raise ConfigError(f"tier {name}: low_watermark is above high_watermark")
    days = raw.get("migrate_after_days")
    return TierSettings(
        name=name,
        path=path.resolve(),
        migrate_after_days=float(days) if days is not None else None,
        high_watermark=high,
        low_watermark=low,
    )


_ENV = {
    "XDSI_DATA_DIR": ("data_dir", Path),
    "XDSI_HOST": ("host", str),
    "XDSI_DICOM_PORT": ("dicom_port", int),
    "XDSI_HTTP_PORT": ("http_port", int),
    "XDSI_AE_TITLE": ("ae_title", str),
    "XDSI_INDEX_URL": ("index_url", str),
    "XDSI_LOG_LEVEL": ("log_level", str),
}


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from an optional TOML file and the environment."""
    env = os.environ if env is None else env
    doc: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        base = p.resolve().parent

    known = {"server", "index", "storage", "peers", "dimse", "xds"}
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"unknown section(s) in config: {', '.join(sorted(unknown))}")

    server = doc.get("server", {})
    kw: dict[str, Any] = {}
    for key in ("host", "dicom_port", "http_port", "ae_title", "log_level"):
        if key in server:
            kw[key] = server[key]
    if "data_dir" in server:
        d = Path(server["data_dir"])
        kw["data_dir"] = d if d.is_absolute() else base / d
    if "url" in doc.get("index", {}):
        kw["index_url"] = str(doc["index"]["url"])

    for var, (key, conv) in _ENV.items():
        if env.get(var):
            kw[key] = conv(env[var])

    settings = Settings(**kw)
    st = doc.get("storage", {})
    if st:
        tiers_raw = st.get("tiers") or []
        data_base = settings.data_dir if settings.data_dir.is_absolute() else base / settings.data_dir
        tiers = tuple(_tier_from(t, data_base) for t in tiers_raw)
        settings = replace(
            settings,
            storage=StorageSettings(
                tiers=tiers or settings.effective_storage.tiers,
                duplicate_policy=str(st.get("duplicate_policy", "keep")),
                recall_on_read=bool(st.get("recall_on_read", True)),
            ),
        )

    peers: dict[str, Peer] = {}
    for aet, p in (doc.get("peers") or {}).items():
        aet = validate_ae_title(aet, "peer AE title")
        try:
            peers[aet] = Peer(aet, str(p["host"]), int(p["port"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"[peers.{aet}] needs host and port") from None
    if peers:
        settings = replace(settings, peers=peers)

    xds = doc.get("xds", {})
    if "repository_unique_id" in xds:
        settings = replace(settings, xds=replace(settings.xds, repository_unique_id=str(xds["repository_unique_id"]).strip()))
    if env.get("XDSI_REPOSITORY_UNIQUE_ID"):
        settings = replace(settings, xds=replace(settings.xds, repository_unique_id=env["XDSI_REPOSITORY_UNIQUE_ID"].strip()))

    dimse = doc.get("dimse", {})
    for key in ("dimse_timeout", "acse_timeout", "network_timeout", "max_associations"):
        if key in dimse:
            settings = replace(settings, **{key: dimse[key]})
    return _validated(settings)


def _validated(s: Settings) -> Settings:
    validate_ae_title(s.ae_title)
    from xdsi.uids import is_valid_uid

    if not is_valid_uid(s.xds.repository_unique_id):
        raise ConfigError(f"[xds] repository_unique_id {s.xds.repository_unique_id!r} is not a valid OID")
    for port_name in ("dicom_port", "http_port"):
        port = getattr(s, port_name)
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"{port_name} {port} out of range")
    st = s.effective_storage
    if st.duplicate_policy not in ("keep", "replace"):
        raise ConfigError(f"storage.duplicate_policy must be 'keep' or 'replace', not {st.duplicate_policy!r}")
    names = [t.name for t in st.tiers]
    if len(set(names)) != len(names):
        raise ConfigError("tier names must be unique")
    if not st.tiers:
        raise ConfigError("at least one storage tier is needed")
    return s
