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
from typing import Any, Collection, Iterable, Mapping

__all__ = [
    "ConfigError",
    "DimseLimits",
    "HttpLimits",
    "Peer",
    "TierSettings",
    "StorageSettings",
    "XdsSettings",
    "Settings",
    "load_settings",
    "parse_size",
    "PartitionSettings",
    "XdsSettings",
    "PatientIdMapping",
    "AuditSettings",
    "DimsePolicySettings",
    "PeerRights",
    "AuthSettings",
    "IuaSettings",
    "Listener",
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
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"not a size: {value!r} (give a whole number of bytes or a string like \"10 GiB\")")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"not a size: {value!r} is negative")
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
    tls: bool = False  # associations we open to it use TLS with our [tls] certificate, verifying it against ca_certificates


@dataclass(frozen=True)
class TierSettings:
    """One storage tier: a directory, ordered fastest first.

    ``migrate_after_days``: studies not read for this long move to the next tier.
    ``high_watermark``/``low_watermark``: when the bytes stored on this tier pass
    the high mark, least-recently-read studies move down until it is under the low mark.
    ``compress``: "jpeg2000-lossless" or "htj2k-lossless" (:data:`COMPRESS_METHODS`):
    image instances migrating onto this tier are stored losslessly compressed,
    verified pixel for pixel before the source copy goes (xdsi.archive.lifecycle).
    """

    name: str
    path: Path
    migrate_after_days: float | None = None
    high_watermark: int | None = None
    low_watermark: int | None = None
    compress: str | None = None


# lossless compression a tier (``compress``) or the store (``[storage] compress_on_receive``) applies,
# and the transfer syntax it stores: JPEG 2000 Lossless, HTJ2K Lossless RPCL (progressive by resolution)
COMPRESS_METHODS = {"jpeg2000-lossless": "1.2.840.10008.1.2.4.90", "htj2k-lossless": "1.2.840.10008.1.2.4.202"}


def compress_method(value: object, where: str) -> str | None:
    """A ``compress`` setting: one of :data:`COMPRESS_METHODS`, or None when absent/false/"none"."""
    if value is None or value is False or value == "none":
        return None
    if not isinstance(value, str) or value not in COMPRESS_METHODS:
        raise ConfigError(f"{where} must be one of {', '.join(sorted(COMPRESS_METHODS))} (or \"none\"), not {value!r}")
    return value


@dataclass(frozen=True)
class StorageSettings:
    tiers: tuple[TierSettings, ...]
    duplicate_policy: str = "keep"  # "keep" the first copy, or "replace" it
    recall_on_read: bool = True  # copy an instance read from a cold tier back to the hot tier
    compress_on_receive: str | None = None  # a COMPRESS_METHODS key: image instances stored compressed at ingest


@dataclass(frozen=True)
class LimitsSettings:
    """``[limits]``: what one request may cost, so a hostile request is refused instead of taking the service down.

    XPath (WADO-WS RetrieveImagingDocumentSetInformation) is evaluated in
    worker processes that are killed at ``xpath_seconds``: XPath 1.0 nesting
    can make evaluation exponential in the expression, and lxml holds the GIL
    while it runs, so no in-process check can stop it.
    """

    xpath_seconds: float = 5.0  # wall-clock budget of one document's XPath evaluations; the worker is killed after it
    xpath_request_seconds: float = 30.0  # all XPath evaluations of one request
    xpath_workers: int = 2  # worker processes, = XPath evaluations at once; more wait (up to the request budget)
    xpath_worker_memory: int = 1024 * 1024 * 1024  # address-space limit (RLIMIT_AS) of each worker, bytes
    xpath_max_length: int = 1024  # characters of one expression
    xpath_per_document: int = 64  # expressions for one document
    xpath_per_request: int = 256  # expressions in one request, all documents together
    xpath_result_bytes: int = 1024 * 1024  # one document's serialised results
    xpath_response_bytes: int = 8 * 1024 * 1024  # all XPath results of one response
    max_render_size: int = 4096  # rows/columns of a rendered image (WADO-URI, WADO-RS, RAD-55): a larger source is scaled down to fit


_LIMIT_SECONDS = ("xpath_seconds", "xpath_request_seconds")
_LIMIT_SIZES = ("xpath_worker_memory", "xpath_result_bytes", "xpath_response_bytes")
_LIMIT_COUNTS = ("xpath_workers", "xpath_max_length", "xpath_per_document", "xpath_per_request", "max_render_size")


def limits_from(raw: object) -> LimitsSettings:
    """Parse ``[limits]``: seconds > 0, sizes as bytes or "8MiB"-style strings, counts >= 1."""
    table = _check_keys("[limits]", raw, set(_LIMIT_SECONDS + _LIMIT_SIZES + _LIMIT_COUNTS))
    return LimitsSettings(**_limit_values("limits", table, _LIMIT_SECONDS + _LIMIT_SIZES + _LIMIT_COUNTS, seconds=_LIMIT_SECONDS, sizes=_LIMIT_SIZES))


def _limit_values(
    section: str, raw: Mapping[str, Any], keys: Iterable[str], *, seconds: Collection[str], sizes: Collection[str], zero_off: Collection[str] = ()
) -> dict[str, Any]:
    """The keys of one table of limits that ``raw`` sets: seconds > 0, sizes as bytes or "8 MiB", counts >= 1
    (or 0 for a key in ``zero_off``, where 0 turns the check off).  [limits], [dimse] and [http] share it."""
    values: dict[str, Any] = {}
    for key in keys:
        if key not in raw:
            continue
        where, value = f"[{section}] {key}", raw[key]
        if key in seconds:
            values[key] = float(_number(where, value))
            continue
        if key in sizes:
            try:
                n = parse_size(value)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        else:
            n = _int(where, value)
        if key in zero_off and n == 0:
            values[key] = 0
        elif n is None or n < 1:
            raise ConfigError(f"{where} must be at least 1, not {value!r}")
        else:
            values[key] = n
    return values


@dataclass(frozen=True)
class HttpLimits:
    """``[http]`` limits: what one HTTP request or connection may cost, refused early with a 4xx.

    Why each exists (issue 9): every one of these was driven to an out-of-memory
    kill, a 500 or a stalled service by a single unauthenticated request.
    """

    threads: int = 32  # worker threads; each request (and each long download) holds one while it runs
    io_timeout: float = 300.0  # seconds a client may stall sending or receiving before it is dropped
    header_timeout: float = 10.0  # seconds for a complete request head; until then the connection holds no thread
    # a request body must arrive at least this fast (bytes/s; 0: off), else 408 and the connection is closed:
    # a body trickled a few bytes a second otherwise holds a worker thread for up to io_timeout per read
    min_body_rate: int = 1024
    body_rate_window: float = 10.0  # seconds of credit: the grace at the start and the longest stall allowed later
    max_soap_envelope: int = 32 * 1024 * 1024  # bytes of a SOAP envelope (plain body or MTOM root part)
    max_mtom_parts: int = 10_000  # MIME parts of one MTOM request
    max_mtom_bytes: int = 4 * 1024**3  # bytes of one SOAP/MTOM request body in all
    max_stow_bytes: int = 4 * 1024**3  # bytes of one STOW-RS request body
    max_frames: int = 10_000  # frame numbers in one WADO-RS frames request (duplicates are refused)
    max_document_requests: int = 50_000  # DocumentRequests in one RAD-69 / ITI-43 / WADO-WS request
    max_query_value: int = 4096  # characters of one QIDO-RS matching value
    max_query_wildcards: int = 64  # '*' and '?' in one QIDO-RS matching value


@dataclass(frozen=True)
class DimseLimits:
    """The ``[dimse]`` limits on what one DICOM peer may cost (issue 9): memory, threads and association slots.

    Why each exists: before them a single unauthenticated peer could announce an
    800 MB A-ASSOCIATE-RQ that was read whole into memory, 40 silent TCP
    connections or 32 held associations locked every other peer out, and a
    connect/close storm left threads waiting 30 s for requests that never came.
    ``max_associations``, the timeouts and the rest of ``[dimse]`` stay flat on
    :class:`Settings`; these are the newer limits, parsed together.
    """

    max_pdu_size: int = 1024 * 1024  # Maximum Length Received we advertise; a P-DATA-TF above it is aborted unread
    max_associate_rq: int = 64 * 1024  # bytes of an A-ASSOCIATE-RQ (and any other non-data PDU); larger: A-ASSOCIATE-RJ
    associate_timeout: float = 10.0  # seconds from TCP accept to a complete A-ASSOCIATE-RQ; then the connection is closed
    max_pending: int = 64  # connections still without an A-ASSOCIATE-RQ; one more closes the oldest of them
    max_associations_per_ae: int = 16  # associations at once from one calling AE title
    max_associations_per_address: int = 24  # associations at once from one IP address
    idle_timeout: float = 300.0  # seconds an association may sit without DIMSE traffic (no operation running); then A-ABORT


DIMSE_LIMIT_KEYS = tuple(DimseLimits.__dataclass_fields__)
_DIMSE_SIZES = {"max_pdu_size", "max_associate_rq"}
_DIMSE_SECONDS = {"associate_timeout", "idle_timeout"}


def dimse_limits_from(raw: Mapping[str, Any]) -> DimseLimits:
    """Parse the ``[dimse]`` limits: sizes as bytes or "1 MiB", seconds > 0, counts >= 1."""
    values = _limit_values("dimse", raw, DIMSE_LIMIT_KEYS, seconds=_DIMSE_SECONDS, sizes=_DIMSE_SIZES)
    limits = DimseLimits(**values)
    # PS3.8 D.1: 0 would mean "unlimited"; dcmtk refuses a Maximum Length below 4096
    if not 4096 <= limits.max_pdu_size <= 256 * 1024 * 1024:
        raise ConfigError(f"[dimse] max_pdu_size must be between 4 KiB and 256 MiB, not {limits.max_pdu_size}")
    if limits.max_associate_rq < 1024:
        raise ConfigError(f"[dimse] max_associate_rq must be at least 1 KiB, not {limits.max_associate_rq}")
    return limits


TLS_PROFILES = ("bcp195", "bcp195-strict", "legacy")


@dataclass(frozen=True)
class TlsSettings:
    """``[tls]``: our node certificate and the peers we trust (IHE ITI-19); see :mod:`xdsi.security.tls`."""

    certificate: Path | None = None  # PEM, our node certificate (with its chain, leaf first)
    private_key: Path | None = None  # PEM, unencrypted, readable only by xdsi
    ca_certificates: Path | None = None  # PEM bundle of the CAs whose certificates we accept from peers
    require_client_certificate: bool = True  # mutual authentication, as ITI-19 requires
    profile: str = "bcp195"  # one of TLS_PROFILES
    crl: Path | None = None  # PEM certificate revocation list(s) of the CAs we trust: a revoked peer certificate is refused


def tls_from(raw: Mapping[str, Any], base: Path) -> TlsSettings:
    """Parse ``[tls]``; relative paths are relative to the config file."""
    raw = _check_keys("[tls]", raw, {"certificate", "private_key", "ca_certificates", "require_client_certificate", "profile", "crl"})
    kw: dict[str, Any] = {}
    for key in ("certificate", "private_key", "ca_certificates", "crl"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise ConfigError(f"[tls] {key} must be the path of a PEM file, not {raw[key]!r}")
            p = Path(raw[key])
            kw[key] = p if p.is_absolute() else base / p
    if "require_client_certificate" in raw:
        if not isinstance(raw["require_client_certificate"], bool):
            raise ConfigError(f"[tls] require_client_certificate must be true or false, not {raw['require_client_certificate']!r}")
        kw["require_client_certificate"] = raw["require_client_certificate"]
    if "profile" in raw:
        if raw["profile"] not in TLS_PROFILES:
            raise ConfigError(f"[tls] profile must be one of {', '.join(TLS_PROFILES)}, not {raw['profile']!r}")
        kw["profile"] = raw["profile"]
    return TlsSettings(**kw)


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("xdsi-data")
    host: str = "127.0.0.1"
    # plain listeners; 0 switches one off (issue 12: a TLS-only node), it never means "any free port"
    dicom_port: int = 11112
    http_port: int = 8080
    # TLS listeners (None, or 0 in the file / environment / flags: none); both need [tls] certificate and private_key
    dicom_tls_port: int | None = None
    https_port: int | None = None
    tls: TlsSettings = field(default_factory=TlsSettings)  # [tls]
    ae_title: str = "XDSI"
    index_url: str | None = None  # None: sqlite file under data_dir
    storage: StorageSettings | None = None  # None: one tier "cache" under data_dir
    peers: Mapping[str, Peer] = field(default_factory=dict)
    # DIMSE tuning
    dimse_timeout: float = 60.0
    acse_timeout: float = 30.0
    network_timeout: float = 60.0
    max_associations: int = 32
    dimse_limits: DimseLimits = field(default_factory=DimseLimits)  # the rest of [dimse]
    log_level: str = "INFO"
    # [http] cors_origins: origins whose scripts may call DICOMweb and WADO-URI (["*"]: any); empty: no CORS
    cors_origins: tuple[str, ...] = ()
    http_limits: HttpLimits = field(default_factory=HttpLimits)  # the rest of [http]
    # further AE titles served by this process, each with its own index and tiers (see PartitionSettings)
    partitions: Mapping[str, "PartitionSettings"] = field(default_factory=dict)
    xds: "XdsSettings" = field(default_factory=lambda: XdsSettings())  # [xds], defined below
    limits: LimitsSettings = field(default_factory=LimitsSettings)  # [limits]
    # [server] public_url: how others reach our HTTP service (https://imaging.example.org), the base of every URL
    # we publish (the KOS Retrieve URL); never derived from the bind address. Empty: the KOS carries no Retrieve URL
    public_url: str = ""
    audit: "AuditSettings" = field(default_factory=lambda: AuditSettings())  # [audit], defined below
    dimse_policy: "DimsePolicySettings" = field(default_factory=lambda: DimsePolicySettings())  # who may call us (issue 13)
    auth: "AuthSettings" = field(default_factory=lambda: AuthSettings())  # [http] auth, allow_anonymous, users_file and [iua], defined below
    xua: "XuaSettings" = field(default_factory=lambda: XuaSettings())  # [xua] (XUA on the SOAP endpoints), defined below
    hl7: "Hl7Settings" = field(default_factory=lambda: Hl7Settings())  # [hl7] and [[prefetch]] (issue 15), defined below
    # [[routes]] (xdsi.routing.settings.Route) and [routing] (its RoutingSettings): forwards to peers (issue 15)
    routes: tuple[Any, ...] = ()
    routing: Any = field(default_factory=lambda: _default_routing())
    # [remotes.NAME] and [gateway] (issue 15): remote archives we forward C-FIND/C-MOVE/C-GET to, defined below
    remotes: Mapping[str, "RemoteSettings"] = field(default_factory=dict)
    gateway: "GatewaySettings" = field(default_factory=lambda: GatewaySettings())
    # [server] workers (issue 14): worker processes sharing the listening sockets; None: one per CPU; 1: a single
    # process with no supervisor (as before workers existed)
    workers: int | None = None
    # [server] cpu_affinity (issue 14): "auto" pins every thread of a worker to its own CPU while the node is busy
    # (xdsi.dimse.affinity); "off" leaves every thread to the scheduler
    cpu_affinity: str = "auto"
    jpip: "JpipSettings" = field(default_factory=lambda: JpipSettings())  # [jpip] (issue 16), defined below

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

    def listeners(self) -> list["Listener"]:
        """The listeners this configuration turns on, in the order ``xdsi serve`` starts them.

        One place decides what "off" means (0, or no TLS port), so the server, the start-up
        line and ``xdsi status`` cannot disagree about which ports are served.
        """
        out = [Listener(setting, scheme, int(port)) for setting, scheme, port in (
            ("http_port", "http", self.http_port),
            ("https_port", "https", self.https_port),
            ("dicom_port", "dicom", self.dicom_port),
            ("dicom_tls_port", "dicom+tls", self.dicom_tls_port),
        ) if port]
        for name, p in self.partitions.items():
            if p.dicom_port:
                out.append(Listener(f"[partitions.{name}] dicom_port", "dicom", int(p.dicom_port), p.ae_title))
            if p.dicom_tls_port:
                out.append(Listener(f"[partitions.{name}] dicom_tls_port", "dicom+tls", int(p.dicom_tls_port), p.ae_title))
        return out

    @property
    def effective_workers(self) -> int:
        """How many worker processes ``xdsi serve`` runs: ``workers``, or the CPUs this process may use."""
        if self.workers is not None:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):  # not Linux
            return max(1, os.cpu_count() or 1)

    def for_partition(self, name: str) -> "Settings":
        """The settings of one partition as a complete archive of its own (own AE title, index, tiers, data dir)."""
        return self.partitions[name].resolve(self)

    def with_overrides(self, **kw: Any) -> "Settings":
        """Apply command-line flags; ``None`` means "not given"."""
        return _validated(replace(self, **{k: v for k, v in kw.items() if v is not None}))


@dataclass(frozen=True)
class Listener:
    """One port ``xdsi serve`` listens on: the setting that turns it on, its scheme, and the AE title it serves."""

    setting: str  # "dicom_port", "https_port", "[partitions.NAME] dicom_port", "[partitions.NAME] dicom_tls_port"
    scheme: str  # "dicom", "dicom+tls", "http", "https"
    port: int
    ae_title: str | None = None  # a partition's own DICOM port; None: the main AE title (and every partition by called AE)

    def url(self, host: str) -> str:
        return f"{self.scheme}://{host}:{self.port}" + ("/" if self.scheme.startswith("http") else "")

    def label(self, host: str) -> str:
        """The URL, and the AE title when it is a partition's own port: how the start-up line and status name it."""
        return self.url(host) + (f" (AE {self.ae_title})" if self.ae_title else "")


def _tier_from(raw: Mapping[str, Any], base: Path) -> TierSettings:
    unknown = set(raw) - {"name", "path", "migrate_after_days", "high_watermark", "low_watermark", "compress"}
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
    try:
        high = parse_size(raw.get("high_watermark"))
        low = parse_size(raw.get("low_watermark"))
    except ConfigError as exc:
        raise ConfigError(f"tier {name}: high_watermark/low_watermark: {exc}") from None
    if (high is None) != (low is None):
        raise ConfigError(f"tier {name}: give both high_watermark and low_watermark, or neither")
    if high is not None and low is not None and low > high:
        raise ConfigError(f"tier {name}: low_watermark is above high_watermark")
    days = raw.get("migrate_after_days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, (int, float)) or days < 0):
        raise ConfigError(f"tier {name}: migrate_after_days must be a number of days >= 0, not {days!r}")
    return TierSettings(
        name=name,
        path=path.resolve(),
        migrate_after_days=float(days) if days is not None else None,
        high_watermark=high,
        low_watermark=low,
        compress=compress_method(raw.get("compress"), f"tier {name}: compress"),
    )


_ENV = {
    "XDSI_DATA_DIR": ("data_dir", Path),
    "XDSI_HOST": ("host", str),
    "XDSI_DICOM_PORT": ("dicom_port", int),
    "XDSI_HTTP_PORT": ("http_port", int),
    "XDSI_DICOM_TLS_PORT": ("dicom_tls_port", int),
    "XDSI_HTTPS_PORT": ("https_port", int),
    "XDSI_AE_TITLE": ("ae_title", str),
    "XDSI_INDEX_URL": ("index_url", str),
    "XDSI_LOG_LEVEL": ("log_level", str),
    "XDSI_PUBLIC_URL": ("public_url", str),
    "XDSI_WORKERS": ("workers", int),
}


HTTP_LIMIT_KEYS = ("threads", "io_timeout", "header_timeout", "min_body_rate", "body_rate_window", "max_soap_envelope", "max_mtom_parts", "max_mtom_bytes",
                   "max_stow_bytes", "max_frames", "max_document_requests", "max_query_value", "max_query_wildcards")
_HTTP_SIZES = {"max_soap_envelope", "max_mtom_bytes", "max_stow_bytes", "min_body_rate"}
_HTTP_SECONDS = {"io_timeout", "header_timeout", "body_rate_window"}
_HTTP_ZERO_OFF = {"min_body_rate"}  # 0 turns the check off

# Keys each section accepts; [xds] is parsed by its own code.
_SECTION_KEYS: dict[str, set[str]] = {
    "server": {"data_dir", "host", "dicom_port", "http_port", "dicom_tls_port", "https_port", "ae_title", "log_level", "public_url", "workers", "cpu_affinity"},
    "index": {"url"},
    "storage": {"tiers", "duplicate_policy", "recall_on_read", "compress_on_receive"},
    "dimse": {"dimse_timeout", "acse_timeout", "network_timeout", "max_associations", *DIMSE_LIMIT_KEYS},
    "http": {"cors_origins", *HTTP_LIMIT_KEYS},
}
_PEER_KEYS = {"host", "port", "tls"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _check_keys(where: str, table: object, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))} (known: {', '.join(sorted(allowed))})")
    return table


def _int(where: str, value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be an integer, not {value!r}") from None


def _number(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where} must be a number of seconds > 0, not {value!r}")
    return value


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from an optional TOML file, the environment and command-line ``overrides``.

    Overrides (``None`` values ignored) are applied before relative tier paths
    are resolved, so ``--data-dir`` moves tiers configured relative to it.
    ``XDSI_CONFIG`` names the file when ``path`` is not given.
    """
    env = os.environ if env is None else env
    if path is None and env.get("XDSI_CONFIG"):
        path = env["XDSI_CONFIG"]
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

    known = {"server", "index", "storage", "peers", "dimse", "xds", "partitions", "http", "limits", "tls", "audit", "xua", "iua",
             "hl7", "prefetch", "remotes", "gateway"}
    known |= {"routes", "routing"}  # issue 15: routing rules (xdsi.routing.settings)
    known |= {"jpip"}  # issue 16: the JPIP server (JpipSettings)
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"unknown section(s) in config: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    for section, keys in _SECTION_KEYS.items():
        if section in doc:
            _check_keys(f"[{section}]", doc[section], keys)

    server = doc.get("server", {})
    kw: dict[str, Any] = {}
    for key in ("host", "ae_title", "log_level", "public_url"):
        if key in server:
            kw[key] = str(server[key])
    for key in ("dicom_port", "http_port", "dicom_tls_port", "https_port"):
        if key in server:
            kw[key] = _int(f"[server] {key}", server[key])
    if "workers" in server:
        kw["workers"] = _int("[server] workers", server["workers"])
    if "cpu_affinity" in server:
        if server["cpu_affinity"] not in ("auto", "off"):
            raise ConfigError(f'[server] cpu_affinity must be "auto" or "off", not {server["cpu_affinity"]!r}')
        kw["cpu_affinity"] = server["cpu_affinity"]
    if "data_dir" in server:
        d = Path(server["data_dir"])
        kw["data_dir"] = d if d.is_absolute() else base / d
    if "url" in doc.get("index", {}):
        kw["index_url"] = str(doc["index"]["url"])

    for var, (key, conv) in _ENV.items():
        if env.get(var):
            kw[key] = _int(f"environment variable {var}", env[var]) if conv is int else conv(env[var])
    kw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "log_level" in kw:
        kw["log_level"] = str(kw["log_level"]).upper()

    settings = Settings(**kw)
    st = doc.get("storage", {})
    if st:
        tiers_raw = st.get("tiers") or []
        if not isinstance(tiers_raw, list) or not all(isinstance(t, dict) for t in tiers_raw):
            raise ConfigError("storage.tiers must be an array of tables: [[storage.tiers]]")
        data_base = settings.data_dir if settings.data_dir.is_absolute() else Path.cwd() / settings.data_dir
        tiers = tuple(_tier_from(t, data_base) for t in tiers_raw)
        recall = st.get("recall_on_read", True)
        if not isinstance(recall, bool):
            raise ConfigError(f"[storage] recall_on_read must be true or false, not {recall!r}")
        settings = replace(
            settings,
            storage=StorageSettings(
                tiers=tiers or settings.effective_storage.tiers,
                duplicate_policy=str(st.get("duplicate_policy", "keep")),
                recall_on_read=recall,
                compress_on_receive=compress_method(st.get("compress_on_receive"), "[storage] compress_on_receive"),
            ),
        )

    peers: dict[str, Peer] = {}
    peers_raw = doc.get("peers") or {}
    if not isinstance(peers_raw, dict):
        raise ConfigError("[peers] must hold one table per AE title: [peers.PACS]")
    for aet, p in peers_raw.items():
        where = f"[peers.{aet}]"
        p = _check_keys(where, p, _PEER_KEYS)
        aet = validate_ae_title(aet, "peer AE title")
        if "host" not in p and "port" not in p:
            continue  # a peer that only calls us (its rights: dimse_policy_from); no association is opened to it
        if "host" not in p or "port" not in p:
            raise ConfigError(f"{where} needs host and port")
        port = _int(f"{where} port", p["port"])
        if not 1 <= port <= 65535:
            raise ConfigError(f"{where} port {port} out of range")
        tls = p.get("tls", False)
        if not isinstance(tls, bool):
            raise ConfigError(f"{where} tls must be true or false, not {tls!r}")
        peers[aet] = Peer(aet, str(p["host"]), port, tls)
    if peers:
        settings = replace(settings, peers=peers)

    if "xds" in doc:
        settings = replace(settings, xds=xds_from(doc["xds"], base))
    if env.get("XDSI_REPOSITORY_UNIQUE_ID"):
        settings = replace(settings, xds=replace(settings.xds, repository_unique_id=env["XDSI_REPOSITORY_UNIQUE_ID"].strip()))

    dimse = doc.get("dimse", {})
    for key in ("dimse_timeout", "acse_timeout", "network_timeout"):
        if key in dimse:
            settings = replace(settings, **{key: _number(f"[dimse] {key}", dimse[key])})
    if "max_associations" in dimse:
        n = _int("[dimse] max_associations", dimse["max_associations"])
        if n < 1:
            raise ConfigError(f"[dimse] max_associations must be at least 1, not {n}")
        settings = replace(settings, max_associations=n)
    settings = replace(settings, dimse_limits=dimse_limits_from(dimse))
    settings = replace(settings, dimse_policy=dimse_policy_from(dimse, peers_raw))
    if "cors_origins" in doc.get("http", {}):
        settings = replace(settings, cors_origins=_cors_origins(doc["http"]["cors_origins"]))
    if "limits" in doc:
        settings = replace(settings, limits=limits_from(doc["limits"]))
    if "tls" in doc:
        settings = replace(settings, tls=tls_from(doc["tls"], base))
    settings = replace(settings, http_limits=_http_limits(doc.get("http", {})))
    if "audit" in doc:
        settings = replace(settings, audit=audit_from(doc["audit"], base))
    settings = replace(settings, auth=auth_from(doc.get("http", {}), doc.get("iua"), base))
    if "xua" in doc:
        settings = replace(settings, xua=xua_from(doc["xua"], base))
    settings = replace(settings, remotes=remotes_from(doc.get("remotes") or {}),
                       gateway=gateway_from(doc.get("gateway"), "[gateway]"))
    parts = _partitions_from(doc.get("partitions") or {}, base)
    if parts:
        settings = replace(settings, partitions=parts)
    if "hl7" in doc or "prefetch" in doc:
        settings = replace(settings, hl7=hl7_from(doc.get("hl7", {}), doc.get("prefetch", []), settings.peers))
    if "routes" in doc or "routing" in doc:  # issue 15: parsed by the routing engine, destinations checked against [peers]
        from xdsi.routing.settings import routes_from, routing_settings_from

        if "routing" in doc:
            settings = replace(settings, routing=routing_settings_from(doc["routing"]))
        if "routes" in doc:
            settings = replace(settings, routes=routes_from(doc["routes"], settings.peers))
    if "jpip" in doc:
        settings = replace(settings, jpip=jpip_from(doc["jpip"]))
    return _validated(settings)


def _http_limits(raw: Mapping[str, Any]) -> HttpLimits:
    """The ``[http]`` limits: sizes as byte counts or "32 MiB", seconds > 0, counts >= 1 (``min_body_rate`` 0: off)."""
    values = _limit_values("http", raw, HTTP_LIMIT_KEYS, seconds=_HTTP_SECONDS, sizes=_HTTP_SIZES, zero_off=_HTTP_ZERO_OFF)
    return HttpLimits(**values)


def _cors_origins(value: object) -> tuple[str, ...]:
    """``[http] cors_origins``: a list of origins (scheme://host[:port]) or ["*"]."""
    where = "[http] cors_origins"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{where} must be a list of origins such as ["https://viewer.example.org"], or ["*"]')
    out: list[str] = []
    for v in value:
        o = v.strip().rstrip("/")
        if o != "*":
            scheme, sep, rest = o.partition("://")
            if not sep or scheme.lower() not in ("http", "https") or not rest or "/" in rest or "?" in rest or "#" in rest:
                raise ConfigError(f"{where}: {v!r} is not an origin (scheme://host[:port], no path), nor \"*\"")
        if o not in out:
            out.append(o)
    return tuple(out)


def _validated(s: Settings) -> Settings:
    validate_ae_title(s.ae_title)
    from xdsi.uids import is_valid_uid

    if s.xds.repository_unique_id and not is_valid_uid(s.xds.repository_unique_id):
        raise ConfigError(f"[xds] repository_unique_id {s.xds.repository_unique_id!r} is not a valid OID")
    s = _validated_public_url(s)
    if s.workers is not None and not 1 <= int(s.workers) <= 256:
        raise ConfigError(f"[server] workers must be between 1 and 256, not {s.workers}")
    for port_name in ("dicom_port", "http_port", "dicom_tls_port", "https_port"):
        if getattr(s, port_name) is None:
            continue
        port = _int(port_name, getattr(s, port_name))
        if not 0 <= port <= 65535:
            raise ConfigError(f"{port_name} {port} out of range (0 switches the listener off)")
        if port == 0 and port_name in ("dicom_tls_port", "https_port"):
            s = replace(s, **{port_name: None})  # one spelling of "off" for TLS ports, which code tests with `is None`
    for peer in s.peers.values():
        if peer.tls and s.tls.ca_certificates is None:
            raise ConfigError(f"[peers.{peer.ae_title}] tls = true needs [tls] ca_certificates (to verify the peer)")
    for port_name in ("dicom_tls_port", "https_port"):
        if getattr(s, port_name) is not None and (s.tls.certificate is None or s.tls.private_key is None):
            raise ConfigError(f"[server] {port_name} needs [tls] certificate and private_key")
    st = s.effective_storage
    if st.duplicate_policy not in ("keep", "replace"):
        raise ConfigError(f"storage.duplicate_policy must be 'keep' or 'replace', not {st.duplicate_policy!r}")
    names = [t.name for t in st.tiers]
    if len(set(names)) != len(names):
        raise ConfigError("tier names must be unique")
    if not st.tiers:
        raise ConfigError("at least one storage tier is needed")
    last = st.tiers[-1]
    if last.migrate_after_days is not None or last.high_watermark is not None:
        raise ConfigError(
            f"tier {last.name} is the last tier: migrate_after_days and watermarks have nowhere to move studies to"
        )
    if str(s.log_level).upper() not in _LOG_LEVELS:
        raise ConfigError(f"log_level {s.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    if s.partitions:
        _validate_partitions(s)
    validate_dimse_policy(s)
    validate_gateway(s)
    listeners = s.listeners()
    if not listeners:
        raise ConfigError("no listener: [server] dicom_port and http_port are 0 (off) and no dicom_tls_port or https_port is set; "
                          "turn at least one on")
    seen: dict[int, str] = {}
    for lst in listeners:
        if lst.port in seen:
            raise ConfigError(f"{lst.setting} {lst.port} is also {seen[lst.port]}: one port, one listener")
        seen[lst.port] = lst.setting
    return s


WILDCARD_HOSTS = ("0.0.0.0", "::", "", "*")  # bind addresses that name no host a consumer could reach


def _validated_public_url(s: Settings) -> Settings:
    """``[server] public_url``: an absolute http(s) URL without query or fragment, stored without a trailing slash.

    Publishing with no public_url while listening on a wildcard address is refused: the
    only URL we could derive (``http://0.0.0.0:8080``) reaches no one.
    """
    url = s.public_url.strip()
    if url:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"[server] public_url {url!r} must be an absolute http:// or https:// URL without query or fragment")
        if parts.hostname in WILDCARD_HOSTS or parts.hostname == "0.0.0.0":
            raise ConfigError(f"[server] public_url {url!r} names a wildcard address; give the host name consumers use")
        url = url.rstrip("/")
    elif s.xds.enabled and not s.xds.retrieve_url and s.host.strip() in WILDCARD_HOSTS:
        raise ConfigError(
            f"[server] host {s.host!r} is a wildcard bind address and [xds] publishing is on: set [server] public_url "
            "(e.g. \"https://imaging.example.org\") so that published manifests carry a URL consumers can reach"
        )
    return s if url == s.public_url else replace(s, public_url=url)


# -- partitions -----------------------------------------------------------------------------------
#
# A partition is a further AE title served by the same process.  It is a whole
# archive of its own: its own index database and its own tiers, so isolation
# holds by construction (no query can reach another partition's rows) and the
# core services need no partition column.  ``Settings.for_partition(name)``
# yields ordinary :class:`Settings` from which ``Archive.open`` builds it.

# DICOMweb resource names that a partition AE title may not take, since it becomes a URL segment
RESERVED_PARTITION_NAMES = frozenset({"studies", "series", "instances", "workitems", "status"})


@dataclass(frozen=True)
class PartitionSettings:
    """``[partitions.NAME]``: ``ae_title`` (default NAME), ``data_dir`` (default ``<data_dir>/partitions/NAME``),
    ``index_url`` (default a SQLite file in its data dir), ``dicom_port`` (optional: a DICOM listener for
    this AE title), ``dicom_tls_port`` (optional: a DICOM TLS listener for this AE title, with the ``[tls]``
    certificate and profile), ``duplicate_policy``, ``recall_on_read`` and ``[[partitions.NAME.tiers]]``
    (default one tier in its data dir); relative paths are under the partition's data dir."""

    name: str
    ae_title: str
    data_dir: Path | None = None
    index_url: str | None = None
    dicom_port: int | None = None
    dicom_tls_port: int | None = None  # None (absent or 0): served over TLS on [server] dicom_tls_port by called AE title only
    tiers: tuple[TierSettings, ...] = ()
    duplicate_policy: str = "keep"
    recall_on_read: bool = True
    peers: tuple[str, ...] | None = None  # AE titles from [peers] that may use this partition; None: any accepted peer
    gateway: "GatewaySettings" = field(default_factory=lambda: GatewaySettings())  # [partitions.NAME.gateway]: its own, off by default
    compress_on_receive: str | None = None  # as [storage] compress_on_receive, for this partition (issue 16)

    def resolve(self, main: "Settings") -> "Settings":
        data_dir = self.data_dir or (main.data_dir / "partitions" / self.name)
        data_dir = data_dir if data_dir.is_absolute() else (main.data_dir / data_dir)
        data_dir = data_dir.resolve()
        tiers = tuple(
            replace(t, path=(t.path if t.path.is_absolute() else data_dir / t.path).resolve()) for t in self.tiers
        ) or (TierSettings(name="cache", path=data_dir / "storage" / "cache"),)
        return replace(
            main,
            ae_title=self.ae_title,
            data_dir=data_dir,
            index_url=self.index_url,
            storage=StorageSettings(tiers=tiers, duplicate_policy=self.duplicate_policy, recall_on_read=self.recall_on_read,
                                    compress_on_receive=self.compress_on_receive),
            dicom_port=self.dicom_port if self.dicom_port is not None else 0,
            partitions={},
            dimse_policy=replace(main.dimse_policy, own_peers=self.peers),
            gateway=self.gateway,
            # the JPIP server serves the main archive only: a partition never hands out a Pixel Data Provider URL
            jpip=replace(main.jpip, enabled=False),
        )


def _partitions_from(raw: Mapping[str, Any], base: Path) -> dict[str, PartitionSettings]:
    out: dict[str, PartitionSettings] = {}
    allowed = {"ae_title", "data_dir", "index_url", "dicom_port", "dicom_tls_port", "tiers", "duplicate_policy", "recall_on_read", "peers",
               "gateway", "compress_on_receive"}
    for name, p in raw.items():
        if not isinstance(p, Mapping):
            raise ConfigError(f"[partitions.{name}] must be a table")
        unknown = set(p) - allowed
        if unknown:
            raise ConfigError(f"unknown key(s) in [partitions.{name}]: {', '.join(sorted(unknown))}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"partition name {name!r}: use letters, digits, '_', '-', '.'")
        tiers = []
        for t in p.get("tiers") or []:
            # relative tier paths stay relative here: they are placed under the partition's data dir
            tier = _tier_from(t, Path("/"))  # validates the keys; the path is re-based below
            tiers.append(replace(tier, path=Path(str(t["path"]))))
        d = p.get("data_dir")
        data_dir = None
        if d is not None:
            data_dir = Path(str(d)) if Path(str(d)).is_absolute() else (base / str(d)).resolve()
        out[name] = PartitionSettings(
            name=name,
            ae_title=validate_ae_title(str(p.get("ae_title", name)), f"partition {name} AE title"),
            data_dir=data_dir,
            index_url=str(p["index_url"]) if p.get("index_url") else None,
            dicom_port=_partition_port(name, p.get("dicom_port")),
            dicom_tls_port=_partition_port(name, p.get("dicom_tls_port"), "dicom_tls_port"),
            tiers=tuple(tiers),
            duplicate_policy=str(p.get("duplicate_policy", "keep")),
            recall_on_read=bool(p.get("recall_on_read", True)),
            compress_on_receive=compress_method(p.get("compress_on_receive"), f"[partitions.{name}] compress_on_receive"),
            peers=partition_peers_from(p["peers"], name) if "peers" in p else None,
            gateway=gateway_from(p.get("gateway"), f"[partitions.{name}.gateway]"),
        )
    return out


def _partition_port(name: str, value: object, key: str = "dicom_port") -> int | None:
    """``[partitions.NAME] dicom_port`` (or ``dicom_tls_port``): a port of its own for this AE title; absent or 0: none
    (served by called AE title on the main DICOM ports, plain or TLS)."""
    if value is None:
        return None
    port = _int(f"[partitions.{name}] {key}", value)
    if not 0 <= port <= 65535:
        raise ConfigError(f"[partitions.{name}] {key} {port} out of range (0: no port of its own)")
    return port or None


def _validate_partitions(s: Settings) -> None:
    """Partitions must not share an AE title, an index database, a data dir or a tier directory."""
    aets = [s.ae_title]
    urls = [s.effective_index_url]
    dirs = [s.data_dir.resolve()]
    tier_paths = [t.path for t in s.effective_storage.tiers]
    for name in s.partitions:
        ps = s.for_partition(name)
        if ps.ae_title.lower() in RESERVED_PARTITION_NAMES:
            raise ConfigError(f"partition {name}: AE title {ps.ae_title!r} would collide with a DICOMweb resource name")
        for what, seen, value in (
            ("AE title", aets, ps.ae_title),
            ("index_url", urls, ps.effective_index_url),
            ("data_dir", dirs, ps.data_dir),
        ):
            if value in seen:
                raise ConfigError(f"partition {name}: {what} {value} is already used by another partition")
            seen.append(value)
        if ps.effective_storage.duplicate_policy not in ("keep", "replace"):
            raise ConfigError(f"partition {name}: duplicate_policy must be 'keep' or 'replace'")
        for t in ps.effective_storage.tiers:
            if any(t.path == q or t.path in q.parents or q in t.path.parents for q in tier_paths):
                raise ConfigError(f"partition {name}: tier {t.name} at {t.path} overlaps another partition's tier")
            tier_paths.append(t.path)
        dp = s.partitions[name].dicom_port
        if dp is not None and dp and dp == s.dicom_port:
            raise ConfigError(f"partition {name}: dicom_port {dp} is the main DICOM port")
        # ITI-19 on a partition's own port too: the same [tls] certificate, trusted CAs and profile as the main node
        # (a port used twice is refused with every other listener, in _validated)
        if s.partitions[name].dicom_tls_port is not None and (s.tls.certificate is None or s.tls.private_key is None):
            raise ConfigError(f"[partitions.{name}] dicom_tls_port needs [tls] certificate and private_key")


# ---------------------------------------------------------------------------------------------
# [xds]: XDS-I.b publishing (issue 4, branch xds).  Issue 3 (branch soap) adds its own
# XdsSettings with ``repository_unique_id``; the fields below are this branch's and keep that
# name, so the lead can merge the two dataclasses into one.
# ---------------------------------------------------------------------------------------------

XDS_MODES = ("off", "repository", "integrated")
UNMAPPED_PATIENTS = ("refuse", "local-authority")  # [xds] unmapped_patients
_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


@dataclass(frozen=True)
class PatientIdMapping:
    """One row of the patient-ID table: a local (Patient ID, Issuer) -> the affinity-domain ID."""

    local_id: str
    local_issuer: str
    affinity_id: str
    affinity_authority: str  # OID of the affinity-domain assigning authority


@dataclass(frozen=True)
class XdsSettings:
    mode: str = "off"  # "off", "repository" (ITI-41 to repository_url) or "integrated" (ITI-42 to registry_url)
    registry_url: str = ""  # ITI-42 endpoint (integrated mode) and ITI-57 update endpoint
    repository_url: str = ""  # ITI-41 endpoint (repository mode)
    update_url: str = ""  # ITI-57 endpoint for deprecation; empty: registry_url
    # our IDS/repository uniqueId (RAD-69 RepositoryUniqueId, KOS Retrieve Location UID); empty: generated
    # once per installation and kept in the data dir (xdsi/installation.py), printed by `xdsi status`
    repository_unique_id: str = ""
    source_id: str = ""  # XDSSubmissionSet.sourceId (our Document Source OID); empty: generated per installation
    home_community_id: str = ""
    # identities
    patient_id_authority: str = "1.3.6.1.4.1.21367.13.20.1000"  # affinity domain (Connectathon IHERED)
    patient_ids: tuple[PatientIdMapping, ...] = ()
    # OID of our local Patient ID domain (sourcePatientId) when the instances' issuer has none; empty: none
    # (a patient whose local issuer OID is unknown is then not published: no invented issuer OIDs)
    source_patient_authority: str = ""
    issuer_oids: Mapping[str, str] = field(default_factory=dict)  # Issuer of Patient ID text -> OID
    accession_authority: str = ""  # issuer of accession numbers (referenceIdList); empty: generated per installation
    # affinity-domain codes: "CODE" or "CODE^SCHEME", looked up in codes_file
    codes_file: Path | None = None  # None: the Connectathon list shipped with xdsi
    class_code: str = "IMAGES"
    confidentiality_code: str = "N"
    healthcare_facility_type_code: str = "22232009"
    practice_setting_code: str = "R-3027B"
    type_code: str = "18748-4"  # used when the study's procedure code is not in the typeCode list
    content_type_code: str = "22232009"
    language_code: str = "en-US"
    # XON; None: "xdsi" with an organization OID generated per installation; "": no authorInstitution
    author_institution: str | None = None
    author_person: str = ""  # XCN; empty: none
    author_role: str = ""
    author_specialty: str = ""
    # KOS retrieve information
    retrieve_ae_title: str = ""  # empty: the server AE title
    retrieve_url: str = ""  # WADO-RS base in the KOS; empty: [server] public_url + "/dicomweb", or none (never the bind address)
    # when
    auto_publish: bool = True
    stability_delay: float = 300.0  # seconds without a new instance before a study is published
    poll_interval: float = 10.0
    # retries
    retry_initial: float = 30.0
    retry_max: float = 3600.0
    retry_factor: float = 2.0
    max_attempts: int = 0  # 0: retry forever
    timeout: float = 60.0
    # where the last KOS and metadata of every study are kept for inspection; None: data_dir/xds
    keep_dir: Path | None = None
    # Series Number of our KOS manifests; 0: the first number above every series of the study
    manifest_series_number: int = 0
    # issue 11: a patient the [[xds.patient_ids]] table does not map is "refuse"d (not published; `xdsi status
    # --study` says which row to add), or published under "local-authority": the local Patient ID taken as an
    # affinity-domain ID (only where the local IDs ARE the domain's, e.g. a Connectathon or a shared MPI)
    unmapped_patients: str = "refuse"
    uid_root: str = ""  # OID root of the UIDs we create (KOS SOP instance and series); empty: generated per installation
    pix_url: str = ""  # PIXm (ITI-83) base URL of the PIX Manager, asked for a patient the table does not map; empty: none

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


_XDS_SCALARS = {
    "mode": str, "registry_url": str, "repository_url": str, "update_url": str, "repository_unique_id": str,
    "source_id": str, "home_community_id": str, "patient_id_authority": str, "source_patient_authority": str,
    "accession_authority": str, "unmapped_patients": str, "uid_root": str, "pix_url": str, "class_code": str, "confidentiality_code": str,
    "healthcare_facility_type_code": str, "practice_setting_code": str, "type_code": str, "content_type_code": str,
    "language_code": str, "author_institution": str, "author_person": str, "author_role": str,
    "author_specialty": str, "retrieve_ae_title": str, "retrieve_url": str, "auto_publish": bool,
    "stability_delay": float, "poll_interval": float, "retry_initial": float, "retry_max": float,
    "retry_factor": float, "max_attempts": int, "timeout": float, "manifest_series_number": int,
}


def xds_from(raw: Mapping[str, Any], base: Path) -> XdsSettings:
    """Build :class:`XdsSettings` from the ``[xds]`` table; paths are relative to the config file."""
    if "known_patient_ids_only" in raw:  # the pre-issue-11 switch: true is what "refuse" now does by default
        if raw["known_patient_ids_only"] is not True or raw.get("unmapped_patients", "refuse") != "refuse":
            raise ConfigError('[xds] known_patient_ids_only is replaced by unmapped_patients (default "refuse": an unmapped '
                              'patient is not published); remove it, and set unmapped_patients = "local-authority" only '
                              "where local Patient IDs are the affinity domain's")
        raw = {k: v for k, v in raw.items() if k != "known_patient_ids_only"}
    unknown = set(raw) - set(_XDS_SCALARS) - {"patient_ids", "issuer_oids", "codes_file", "keep_dir"}
    if unknown:
        raise ConfigError(f"unknown key(s) in [xds]: {', '.join(sorted(unknown))}")
    kw: dict[str, Any] = {}
    for key, conv in _XDS_SCALARS.items():
        if key in raw:
            try:
                kw[key] = conv(raw[key])
            except (TypeError, ValueError):
                raise ConfigError(f"[xds] {key}: {raw[key]!r} is not a {conv.__name__}") from None
    for key in ("codes_file", "keep_dir"):
        if raw.get(key):
            p = Path(str(raw[key]))
            kw[key] = (p if p.is_absolute() else base / p).resolve()
    if "issuer_oids" in raw:
        kw["issuer_oids"] = {str(k): str(v) for k, v in dict(raw["issuer_oids"]).items()}
    rows = []
    for r in raw.get("patient_ids") or []:
        try:
            rows.append(
                PatientIdMapping(
                    local_id=str(r["local_id"]),
                    local_issuer=str(r.get("local_issuer", "")),
                    affinity_id=str(r["affinity_id"]),
                    affinity_authority=str(r.get("affinity_authority", kw.get("patient_id_authority", XdsSettings.patient_id_authority))),
                )
            )
        except (KeyError, TypeError):
            raise ConfigError("[[xds.patient_ids]] needs local_id and affinity_id (local_issuer, affinity_authority optional)") from None
    kw["patient_ids"] = tuple(rows)
    return validate_xds(XdsSettings(**kw))


def validate_xds(x: XdsSettings) -> XdsSettings:
    if x.mode not in XDS_MODES:
        raise ConfigError(f"[xds] mode must be one of {', '.join(XDS_MODES)}, not {x.mode!r}")
    if x.mode == "repository" and not x.repository_url:
        raise ConfigError("[xds] mode = \"repository\" needs repository_url (the ITI-41 endpoint)")
    if x.mode == "integrated" and not x.registry_url:
        raise ConfigError("[xds] mode = \"integrated\" needs registry_url (the ITI-42 endpoint)")
    if x.unmapped_patients not in UNMAPPED_PATIENTS:
        raise ConfigError(f"[xds] unmapped_patients must be one of {', '.join(UNMAPPED_PATIENTS)}, not {x.unmapped_patients!r}")
    # empty: generated per installation (repository_unique_id, source_id, accession_authority, uid_root) or none
    optional = {"repository_unique_id": x.repository_unique_id, "source_id": x.source_id,
                "source_patient_authority": x.source_patient_authority, "accession_authority": x.accession_authority,
                "uid_root": x.uid_root}
    oids = {"patient_id_authority": x.patient_id_authority, **{k: v for k, v in optional.items() if v}}
    oids.update({f"patient_ids[{m.local_id}].affinity_authority": m.affinity_authority for m in x.patient_ids})
    oids.update({f"issuer_oids.{k}": v for k, v in x.issuer_oids.items()})
    for name, value in oids.items():
        if not _OID_RE.match(value) or len(value) > 64:
            raise ConfigError(f"[xds] {name} {value!r} is not an OID")
    if x.pix_url and not re.match(r"^https?://[^/?#]+", x.pix_url):
        raise ConfigError(f"[xds] pix_url {x.pix_url!r} must be an http:// or https:// URL (the PIXm FHIR base)")
    if x.uid_root and len(x.uid_root) > 50:
        raise ConfigError(f"[xds] uid_root {x.uid_root!r} is longer than 50 characters: too few digits left for unique UIDs")
    if x.retry_initial <= 0 or x.retry_max < x.retry_initial or x.retry_factor < 1:
        raise ConfigError("[xds] retry policy: need 0 < retry_initial <= retry_max and retry_factor >= 1")
    if x.stability_delay < 0 or x.poll_interval <= 0:
        raise ConfigError("[xds] stability_delay must be >= 0 and poll_interval > 0")
    return x


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: where the ATNA audit trail (ITI-20) goes and how much of it may wait on disk.

    With no ``repositories`` nothing is audited.  Messages wait in a durable spool
    (``spool_path``, default ``data_dir/audit/spool.sqlite``) until every repository has
    taken them, across outages and restarts; at ``spool_max_messages`` new ones are refused
    and counted (``xdsi status``) rather than older evidence being dropped.
    """

    repositories: tuple[str, ...] = ()  # "tls://arr.example.org:6514" (RFC 5425), "udp://arr.example.org:514" (RFC 5426)
    audit_source_id: str = ""  # AuditSourceID; empty: our AE title
    enterprise_site_id: str = ""  # AuditEnterpriseSiteID; empty: left out
    audit_source_type: str = "4"  # AuditSourceTypeCode 1-9 (RFC 3881); 4 = Application Server
    spool_max_messages: int = 100_000
    spool_path: Path | None = None
    retry_seconds: float = 1.0  # first wait after a failed delivery; doubles up to retry_max_seconds
    retry_max_seconds: float = 30.0


_AUDIT_KEYS = set(AuditSettings.__dataclass_fields__)


def audit_from(raw: object, base: Path) -> AuditSettings:
    """Parse ``[audit]``: repository URLs checked here, so a typo stops start-up instead of losing the trail."""
    from xdsi.audit.sender import parse_repository

    table = _check_keys("[audit]", raw, _AUDIT_KEYS)
    kw: dict[str, Any] = {}
    repos = table.get("repositories", [])
    if not isinstance(repos, list) or not all(isinstance(r, str) for r in repos):
        raise ConfigError(f"[audit] repositories must be a list of URLs, not {repos!r}")
    for url in repos:
        try:
            parse_repository(url)
        except ValueError as exc:
            raise ConfigError(f"[audit] repositories: {exc}") from None
    if len(set(repos)) != len(repos):
        raise ConfigError("[audit] repositories lists a repository twice")
    kw["repositories"] = tuple(repos)
    for key in ("audit_source_id", "enterprise_site_id", "audit_source_type"):
        if key in table:
            if not isinstance(table[key], str):
                raise ConfigError(f"[audit] {key} must be a string, not {table[key]!r}")
            kw[key] = table[key].strip()
    if kw.get("audit_source_type", "4") not in set("123456789"):
        raise ConfigError(f"[audit] audit_source_type must be one of 1-9 (RFC 3881), not {kw['audit_source_type']!r}")
    if "spool_max_messages" in table:
        n = _int("[audit] spool_max_messages", table["spool_max_messages"])
        if n < 1:
            raise ConfigError(f"[audit] spool_max_messages must be at least 1, not {n}")
        kw["spool_max_messages"] = n
    if "spool_path" in table:
        if not isinstance(table["spool_path"], str) or not table["spool_path"]:
            raise ConfigError(f"[audit] spool_path must be a file path, not {table['spool_path']!r}")
        p = Path(table["spool_path"])
        kw["spool_path"] = p if p.is_absolute() else base / p
    for key in ("retry_seconds", "retry_max_seconds"):
        if key in table:
            kw[key] = float(_number(f"[audit] {key}", table[key]))
    return AuditSettings(**kw)


# ---------------------------------------------------------------------------------------------
# DICOM peer policy (issue 13 item 1): who may associate with us and do what.
# [dimse] accept_any_called_aet / accept_unknown_peers, [peers.AET] store/find/move/get/commit/
# hosts/tls_subject, [partitions.NAME] peers.  The decisions are made in xdsi.dimse.policy.
# ---------------------------------------------------------------------------------------------

DIMSE_OPERATIONS = ("store", "find", "move", "get", "commit")
DIMSE_POLICY_KEYS = {"accept_any_called_aet", "accept_unknown_peers"}
PEER_POLICY_KEYS = {*DIMSE_OPERATIONS, "hosts", "tls_subject"}
_SECTION_KEYS["dimse"] |= DIMSE_POLICY_KEYS
_PEER_KEYS |= PEER_POLICY_KEYS


@dataclass(frozen=True)
class PeerRights:
    """``[peers.AET]`` seen as a caller: what it may do, and from where / with which certificate.

    Why ``hosts`` and ``tls_subject``: an AE title is a name the peer chooses, not an identity.
    A known AE title from an address outside ``hosts``, or without the certificate subject
    ``tls_subject`` names, is treated as an unknown caller.
    """

    ae_title: str
    store: bool = True
    find: bool = True
    move: bool = True
    get: bool = True
    commit: bool = True
    hosts: tuple[str, ...] | None = None  # networks ("10.0.0.0/24", "10.0.0.7/32"); None: any address
    tls_subject: str | None = None  # RFC 4514 subject the peer's certificate must carry; None: no TLS required

    def allows(self, operation: str) -> bool:
        return bool(getattr(self, operation))


@dataclass(frozen=True)
class DimsePolicySettings:
    """``[dimse] accept_any_called_aet`` / ``accept_unknown_peers`` and every ``[peers.AET]`` as a caller.

    ``accept_unknown_peers`` None means "true only while [server] host is a loopback address": a
    fresh install on a laptop answers local tools, one listening on a network refuses strangers.
    ``own_peers`` is the ``[partitions.NAME] peers`` allow-list of the archive these settings are
    for (set by :meth:`PartitionSettings.resolve`); None lets any accepted peer use it.
    """

    accept_any_called_aet: bool = False
    accept_unknown_peers: bool | None = None
    peers: Mapping[str, PeerRights] = field(default_factory=dict)
    own_peers: tuple[str, ...] | None = None

    def accepts_unknown_peers(self, host: str) -> bool:
        if self.accept_unknown_peers is not None:
            return self.accept_unknown_peers
        return is_loopback_host(host)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127/8, ::1); a wildcard or any other name is not."""
    import ipaddress

    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def canonical_subject(value: str, where: str) -> str:
    """An RFC 4514 subject ("CN=modality1.example.org,O=Hospital") in the form we compare certificates with.

    Spaces after the separating commas are allowed; the result is what
    ``cryptography``'s ``Name.rfc4514_string()`` prints for a certificate with that subject.
    """
    from cryptography import x509

    text = re.sub(r"(?<!\\)([,+])\s+", r"\1", value.strip())
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError:
        name = None
    if name is None or not list(name):
        raise ConfigError(
            f"{where} {value!r} is not an RFC 4514 subject such as \"CN=modality1.example.org,O=Hospital\" "
            "(openssl x509 -noout -subject -nameopt RFC2253 prints it)"
        )
    return name.rfc4514_string()


def _networks(value: object, where: str) -> tuple[str, ...]:
    import ipaddress

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of addresses or networks such as [\"10.0.0.7\", \"10.1.0.0/16\"], not {value!r}")
    out: list[str] = []
    for v in value:
        try:
            out.append(str(ipaddress.ip_network(v.strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"{where}: {v!r} is not an IP address or network (host names are not accepted: give addresses)") from None
    return tuple(out)


def dimse_policy_from(dimse: Mapping[str, Any], peers_raw: Mapping[str, Any]) -> DimsePolicySettings:
    """Parse the policy keys of ``[dimse]`` and of every ``[peers.AET]`` (tables already key-checked)."""
    kw: dict[str, Any] = {}
    for key in DIMSE_POLICY_KEYS:
        if key in dimse:
            if not isinstance(dimse[key], bool):
                raise ConfigError(f"[dimse] {key} must be true or false, not {dimse[key]!r}")
            kw[key] = dimse[key]
    rights: dict[str, PeerRights] = {}
    for name, p in peers_raw.items():
        aet = validate_ae_title(name, "peer AE title")
        where = f"[peers.{aet}]"
        r: dict[str, Any] = {}
        for op in DIMSE_OPERATIONS:
            if op in p:
                if not isinstance(p[op], bool):
                    raise ConfigError(f"{where} {op} must be true or false, not {p[op]!r}")
                r[op] = p[op]
        if "hosts" in p:
            r["hosts"] = _networks(p["hosts"], f"{where} hosts")
        if "tls_subject" in p:
            if not isinstance(p["tls_subject"], str):
                raise ConfigError(f"{where} tls_subject must be a string, not {p['tls_subject']!r}")
            r["tls_subject"] = canonical_subject(p["tls_subject"], f"{where} tls_subject")
        rights[aet] = PeerRights(aet, **r)
    return DimsePolicySettings(peers=rights, **kw)


def partition_peers_from(value: object, name: str) -> tuple[str, ...]:
    """``[partitions.NAME] peers``: AE titles from ``[peers]`` (checked in :func:`validate_dimse_policy`)."""
    where = f"[partitions.{name}] peers"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of AE titles from [peers], not {value!r}")
    return tuple(validate_ae_title(v, f"{where} entry") for v in value)


def validate_dimse_policy(s: Settings) -> None:
    """A partition's ``peers`` must name AE titles configured in ``[peers]``: an allow-list of
    identities, whose ``hosts``/``tls_subject`` say what makes the AE title believable.  A peer
    with a ``tls_subject`` can only call a DICOM TLS listener: without one it could never associate."""
    if s.dicom_tls_port is None and not any(p.dicom_tls_port for p in s.partitions.values()):
        pinned = sorted(aet for aet, r in s.dimse_policy.peers.items() if r.tls_subject is not None)
        if pinned:
            raise ConfigError(f"[peers.{pinned[0]}] tls_subject needs a DICOM TLS listener ([server] or [partitions.NAME] dicom_tls_port, and [tls])")
    for name, p in s.partitions.items():
        for aet in p.peers or ():
            if aet not in s.dimse_policy.peers:
                raise ConfigError(f"[partitions.{name}] peers: {aet!r} is not configured in [peers] (add [peers.{aet}])")


# -- iua: who may use the HTTP services (issue 13) ----------------------------------------------------
# [http] auth / allow_anonymous / users_file and the [iua] table; see xdsi.web.auth for how they are used.

HTTP_AUTH_MODES = ("none", "bearer", "basic")
AUTH_RIGHTS = ("read", "write", "admin")
SOAP_AUTH_MODES = ("http", "xua")
HTTP_AUTH_KEYS = {"auth", "allow_anonymous", "users_file", "soap_auth"}
_SECTION_KEYS["http"] |= HTTP_AUTH_KEYS


@dataclass(frozen=True)
class IuaSettings:
    """``[iua]``: the IUA Authorization Server whose JWT access tokens we accept (``[http] auth = "bearer"``)."""

    issuer: str = ""  # the "iss" every token must carry, exactly
    audience: tuple[str, ...] = ()  # accepted "aud" values (ours: e.g. our public URL); a token must name one
    jwks_url: str = ""  # the issuer's JWKS (http(s)); or
    jwks_file: Path | None = None  # a JWKS file (relative to the config file)
    jwks_ca_certificates: Path | None = None  # https jwks_url: verify against this PEM bundle instead of the system's
    clock_skew_seconds: float = 30.0  # leeway on exp / nbf / iat
    jwks_refresh_seconds: float = 60.0  # a token with an unknown kid refetches the JWKS at most this often
    jwks_max_age_seconds: float = 3600.0  # a JWKS older than this is refetched on next use
    algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
    # scope -> rights it grants; the default maps the scopes "read", "write", "admin" to the rights of that name
    scopes: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {r: (r,) for r in AUTH_RIGHTS})


@dataclass(frozen=True)
class AuthSettings:
    """``[http] auth``: "none" (anyone who reaches the port; refused at start on a non-loopback address unless
    ``allow_anonymous = true``), "bearer" (IUA tokens, ``[iua]``) or "basic" (``users_file``)."""

    mode: str = "none"
    allow_anonymous: bool = False
    users_file: Path | None = None  # None: <data_dir>/users
    # the SOAP endpoints (RAD-69, WADO-WS, ITI-43): "http" = the same HTTP credentials as everything else;
    # "xua" = left to XUA alone (SAML in wsse:Security, as IHE consumers send it), allowed only with [xua] required
    soap_auth: str = "http"
    iua: IuaSettings = field(default_factory=IuaSettings)


_IUA_KEYS = set(IuaSettings.__dataclass_fields__)


def _path_setting(where: str, value: object, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a file path, not {value!r}")
    p = Path(value)
    return p if p.is_absolute() else base / p


def _iua_from(raw: object, base: Path) -> IuaSettings:
    table = _check_keys("[iua]", raw, _IUA_KEYS)
    kw: dict[str, Any] = {}
    for key in ("issuer", "jwks_url"):
        if key in table:
            if not isinstance(table[key], str) or not table[key].strip():
                raise ConfigError(f"[iua] {key} must be a non-empty string, not {table[key]!r}")
            kw[key] = table[key].strip()
    if "jwks_url" in kw and not re.match(r"^https?://[^/?#]+", kw["jwks_url"]):
        raise ConfigError(f"[iua] jwks_url {kw['jwks_url']!r} must be an http:// or https:// URL")
    if "audience" in table:
        aud = table["audience"]
        aud = [aud] if isinstance(aud, str) else aud
        if not isinstance(aud, list) or not aud or not all(isinstance(a, str) and a.strip() for a in aud):
            raise ConfigError(f"[iua] audience must be a string or a list of strings, not {table['audience']!r}")
        kw["audience"] = tuple(a.strip() for a in aud)
    for key in ("jwks_file", "jwks_ca_certificates"):
        if key in table:
            kw[key] = _path_setting(f"[iua] {key}", table[key], base)
    if "clock_skew_seconds" in table:
        v = table["clock_skew_seconds"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 600:
            raise ConfigError(f"[iua] clock_skew_seconds must be a number of seconds from 0 to 600, not {v!r}")
        kw["clock_skew_seconds"] = float(v)
    for key in ("jwks_refresh_seconds", "jwks_max_age_seconds"):
        if key in table:
            kw[key] = float(_number(f"[iua] {key}", table[key]))
    if "algorithms" in table:
        algs = table["algorithms"]
        allowed = IuaSettings.algorithms
        if not isinstance(algs, list) or not algs or not all(a in allowed for a in algs):
            raise ConfigError(f"[iua] algorithms must be a list of {', '.join(allowed)} (asymmetric only), not {algs!r}")
        kw["algorithms"] = tuple(algs)
    if "scopes" in table:
        scopes = table["scopes"]
        if not isinstance(scopes, dict) or not scopes:
            raise ConfigError('[iua] scopes must be a table of scope = right(s), e.g. [iua.scopes] "user/*.read" = "read"')
        out: dict[str, tuple[str, ...]] = {}
        for scope, rights in scopes.items():
            rights = [rights] if isinstance(rights, str) else rights
            if not isinstance(rights, list) or not rights or not all(r in AUTH_RIGHTS for r in rights):
                raise ConfigError(f"[iua.scopes] {scope!r} must name rights among {', '.join(AUTH_RIGHTS)}, not {scopes[scope]!r}")
            out[str(scope)] = tuple(rights)
        kw["scopes"] = out
    return IuaSettings(**kw)


def auth_from(http: Mapping[str, Any], iua: object, base: Path) -> AuthSettings:
    """Parse ``[http] auth``, ``allow_anonymous``, ``users_file`` and ``[iua]``; "bearer" needs a complete ``[iua]``."""
    kw: dict[str, Any] = {}
    if "auth" in http:
        if http["auth"] not in HTTP_AUTH_MODES:
            raise ConfigError(f"[http] auth must be one of {', '.join(HTTP_AUTH_MODES)}, not {http['auth']!r}")
        kw["mode"] = http["auth"]
    if "allow_anonymous" in http:
        if not isinstance(http["allow_anonymous"], bool):
            raise ConfigError(f"[http] allow_anonymous must be true or false, not {http['allow_anonymous']!r}")
        kw["allow_anonymous"] = http["allow_anonymous"]
    if "users_file" in http:
        kw["users_file"] = _path_setting("[http] users_file", http["users_file"], base)
    if "soap_auth" in http:
        if http["soap_auth"] not in SOAP_AUTH_MODES:
            raise ConfigError(f"[http] soap_auth must be one of {', '.join(SOAP_AUTH_MODES)}, not {http['soap_auth']!r}")
        kw["soap_auth"] = http["soap_auth"]
    if iua is not None:
        kw["iua"] = _iua_from(iua, base)
    auth = AuthSettings(**kw)
    if auth.mode == "bearer":
        i = auth.iua
        if not i.issuer or not i.audience:
            raise ConfigError('[http] auth = "bearer" needs [iua] issuer and audience (the iss and aud our tokens carry)')
        if bool(i.jwks_url) == (i.jwks_file is not None):
            raise ConfigError('[http] auth = "bearer" needs exactly one of [iua] jwks_url or jwks_file (the issuer\'s keys)')
    return auth
# -- [xua] (issue 13, helper xua) ------------------------------------------------------------------


@dataclass(frozen=True)
class XuaSettings:
    """``[xua]``: SAML 2.0 identity assertions (IHE XUA, ITI-40) on RAD-69, WADO-WS and ITI-43.

    With ``trusted_issuers`` set, every assertion that comes in a ``wsse:Security`` header is
    validated (signature by one of these X-Assertion Providers, or by a certificate one of them
    issued; validity window; ``audience``) and a bad one is refused with a WS-Security fault;
    ``required`` also refuses a request that carries none.  Without ``trusted_issuers`` an
    assertion is only logged, unverified, as before.
    """

    required: bool = False
    trusted_issuers: tuple[Path, ...] = ()  # PEM files: the X-Assertion Providers' signing certificates or their CAs
    audience: tuple[str, ...] = ()  # URIs naming us (ITI-40: the X-Service Provider, optionally the affinity domain)
    clock_skew_seconds: float = 60.0  # tolerance on NotBefore / NotOnOrAfter / IssueInstant

    @property
    def enabled(self) -> bool:
        return bool(self.trusted_issuers)


_XUA_KEYS = set(XuaSettings.__dataclass_fields__)


def xua_from(raw: object, base: Path) -> XuaSettings:
    """Parse ``[xua]``; relative certificate paths are relative to the config file (read at start-up)."""
    table = _check_keys("[xua]", raw, _XUA_KEYS)
    kw: dict[str, Any] = {}
    if "required" in table:
        if not isinstance(table["required"], bool):
            raise ConfigError(f"[xua] required must be true or false, not {table['required']!r}")
        kw["required"] = table["required"]
    issuers = table.get("trusted_issuers", [])
    if isinstance(issuers, str):
        issuers = [issuers]
    if not isinstance(issuers, list) or not all(isinstance(i, str) and i for i in issuers):
        raise ConfigError(f"[xua] trusted_issuers must be a list of PEM certificate file paths, not {issuers!r}")
    kw["trusted_issuers"] = tuple(p if p.is_absolute() else base / p for p in map(Path, issuers))
    audience = table.get("audience", [])
    if isinstance(audience, str):
        audience = [audience]
    if not isinstance(audience, list) or not all(isinstance(a, str) and a.strip() for a in audience):
        raise ConfigError(f"[xua] audience must be a URI or a list of URIs, not {audience!r}")
    kw["audience"] = tuple(a.strip() for a in audience)
    if "clock_skew_seconds" in table:
        skew = table["clock_skew_seconds"]
        if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not 0 <= skew <= 3600:
            raise ConfigError(f"[xua] clock_skew_seconds must be a number of seconds from 0 to 3600, not {skew!r}")
        kw["clock_skew_seconds"] = float(skew)
    x = XuaSettings(**kw)
    from xdsi.security.xua import load_certificates  # here: the certificates are checked before anything listens

    for path in x.trusted_issuers:
        load_certificates(path)
    if x.required and not x.trusted_issuers:
        raise ConfigError("[xua] required = true needs trusted_issuers (the X-Assertion Providers' certificates)")
    if x.trusted_issuers and not x.audience:
        # ITI-40 3.40.4.1.2: the assertion carries an AudienceRestriction naming the X-Service Provider; we must know our name
        raise ConfigError("[xua] trusted_issuers needs audience: the URI(s) X-Assertion Providers put in AudienceRestriction for this service")
    return x


# -- [hl7] and [[prefetch]] (issue 15 item 4): the HIS/RIS interface -------------------------------------------

HL7_TRIGGERS = ("ORM^O01", "OMI^O23", "ADT^A01", "ADT^A04", "ADT^A05")  # messages that may trigger a prefetch


@dataclass(frozen=True)
class PrefetchRule:
    """One ``[[prefetch]]`` rule: which message triggers it, which priors it selects, where they go.

    Why rules and not "everything of the patient": a prior is recalled from a slow tier to
    the cache (and perhaps pushed over the network) before the radiologist opens the new
    study; recalling every study of a patient with a long history fills the cache with
    what nobody reads.  A prior is selected when it has a series of one of ``modalities``
    (any, when empty) and of one of ``body_parts`` (any, when empty); of those, the
    ``last_studies`` most recent (0: all) within ``years`` years (0: any age).
    ``same_modality``: the order's own modality (OBR-24 / IPC-5) is required as well.
    """

    name: str
    triggers: tuple[str, ...] = HL7_TRIGGERS  # "ORM^O01", "ADT^A04", ...
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    same_modality: bool = False
    last_studies: int = 0
    years: int = 0
    recall: bool = True  # copy the priors from slower tiers to the first (cache) tier
    push_to: str = ""  # a [peers.AE] to send the priors to by C-STORE; "" = none
    # [remotes.NAME] asked for priors we do not hold (C-FIND by Patient ID, then fetched to the first tier);
    # None: the [gateway] remotes when the gateway is on, else none; (): our own index only
    remotes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Hl7Settings:
    """``[hl7]``: the MLLP listener for HL7 v2 from the HIS/RIS (orders, patient updates)."""

    port: int = 0  # 0: no listener
    tls: bool = False  # the port speaks TLS with the [tls] certificate (mutual if require_client_certificate)
    application: str = "XDSI"  # MSH-3 of our ACKs (Sending Application)
    facility: str = ""  # MSH-4 of our ACKs (Sending Facility)
    max_message_bytes: int = 1024 * 1024  # one MLLP block; larger: NAK (AR) and the block is skipped
    read_timeout: float = 300.0  # seconds a connection may stay silent before it is closed
    # RAD-12 patient update: republish (RPLC) the manifest of every registered study whose patient changed
    republish: bool = True
    prefetch: tuple[PrefetchRule, ...] = ()  # [[prefetch]]
    charset: str = "utf-8"  # Python codec of messages whose MSH-18 is empty (HL7's default is ASCII; many HIS send Latin-1)
    # MSH-11 processing IDs applied; others are refused (AR 202): a training (T) or debugging (D) merge must not
    # change the production index
    processing_ids: tuple[str, ...] = ("P",)


_HL7_KEYS = {"port", "tls", "application", "facility", "max_message_bytes", "read_timeout", "republish", "charset", "processing_ids"}
_PREFETCH_KEYS = {"name", "triggers", "modalities", "body_parts", "same_modality", "last_studies", "years", "recall", "push_to",
                  "remotes"}


def _str_list(where: str, value: object, upper: bool = True) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where} must be a list of strings, not {value!r}")
    return tuple(v.strip().upper() if upper else v.strip() for v in value)


def _bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    return value


def hl7_from(raw: object, prefetch_raw: object, peers: Mapping[str, Peer]) -> Hl7Settings:
    """Parse ``[hl7]`` and ``[[prefetch]]``; a prefetch rule's ``push_to`` must name a ``[peers.AE]`` with host and port."""
    table = _check_keys("[hl7]", raw, _HL7_KEYS)
    kw: dict[str, Any] = {}
    if "port" in table:
        port = _int("[hl7] port", table["port"])
        if not 0 <= port <= 65535:
            raise ConfigError(f"[hl7] port {port} out of range (0 turns the listener off)")
        kw["port"] = port
    for key in ("tls", "republish"):
        if key in table:
            kw[key] = _bool(f"[hl7] {key}", table[key])
    for key in ("application", "facility"):
        if key in table:
            v = table[key]
            if not isinstance(v, str) or any(c in v for c in "|^~\\&\r\n"):
                raise ConfigError(f"[hl7] {key} must be a string without HL7 delimiters, not {v!r}")
            kw[key] = v
    if "max_message_bytes" in table:
        try:
            n = parse_size(table["max_message_bytes"])
        except ConfigError as exc:
            raise ConfigError(f"[hl7] max_message_bytes: {exc}") from None
        if n is None or n < 1024:
            raise ConfigError(f"[hl7] max_message_bytes must be at least 1 KiB, not {table['max_message_bytes']!r}")
        kw["max_message_bytes"] = n
    if "read_timeout" in table:
        kw["read_timeout"] = float(_number("[hl7] read_timeout", table["read_timeout"]))
    if "charset" in table:
        import codecs

        try:
            kw["charset"] = codecs.lookup(str(table["charset"])).name
        except LookupError:
            raise ConfigError(f"[hl7] charset {table['charset']!r} is not a character set Python knows (e.g. \"utf-8\", \"iso8859-1\")") from None
    if "processing_ids" in table:
        ids = _str_list("[hl7] processing_ids", table["processing_ids"])
        if not ids or any(i not in ("P", "T", "D") for i in ids):
            raise ConfigError(f"[hl7] processing_ids must list some of \"P\", \"T\", \"D\" (HL7 table 0103), not {table['processing_ids']!r}")
        kw["processing_ids"] = ids
    if not isinstance(prefetch_raw, list) or not all(isinstance(r, dict) for r in prefetch_raw):
        raise ConfigError("prefetch must be an array of tables: [[prefetch]]")
    rules: list[PrefetchRule] = []
    for i, r in enumerate(prefetch_raw):
        where = f"[[prefetch]] #{i + 1}"
        r = _check_keys(where, r, _PREFETCH_KEYS)
        name = str(r.get("name", f"prefetch-{i + 1}"))
        where = f"[[prefetch]] {name!r}"
        rk: dict[str, Any] = {"name": name}
        if "triggers" in r:
            rk["triggers"] = _str_list(f"{where} triggers", r["triggers"])
            bad = [t for t in rk["triggers"] if t not in HL7_TRIGGERS]
            if bad:
                raise ConfigError(f"{where} triggers: {', '.join(bad)} not one of {', '.join(HL7_TRIGGERS)}")
        for key in ("modalities", "body_parts"):
            if key in r:
                rk[key] = _str_list(f"{where} {key}", r[key])
        for key in ("same_modality", "recall"):
            if key in r:
                rk[key] = _bool(f"{where} {key}", r[key])
        for key in ("last_studies", "years"):
            if key in r:
                n = _int(f"{where} {key}", r[key])
                if n < 0:
                    raise ConfigError(f"{where} {key} must be 0 (no limit) or more, not {n}")
                rk[key] = n
        if "push_to" in r:
            aet = validate_ae_title(str(r["push_to"]), f"{where} push_to")
            if aet not in peers:
                raise ConfigError(f"{where} push_to {aet!r} is not a [peers.{aet}] with host and port")
            rk["push_to"] = aet
        if "remotes" in r:  # checked against [remotes.NAME] by validate_gateway (parsed after [hl7])
            names = r["remotes"]
            if not isinstance(names, list) or not all(isinstance(v, str) and v for v in names):
                raise ConfigError(f'{where} remotes must be a list of [remotes.NAME] names, such as ["PACS1"], not {names!r}')
            rk["remotes"] = tuple(dict.fromkeys(names))
        rule = PrefetchRule(**rk)
        if not rule.recall and not rule.push_to:
            raise ConfigError(f"{where} does nothing: set recall = true or push_to")
        rules.append(rule)
    names = [r.name for r in rules]
    if len(names) != len(set(names)):
        raise ConfigError("[[prefetch]] rule names must be unique")
    return Hl7Settings(**kw, prefetch=tuple(rules))
def _default_routing() -> Any:
    """``[routing]`` defaults (xdsi.routing.settings.RoutingSettings), imported late: routing imports config."""
    from xdsi.routing.settings import RoutingSettings

    return RoutingSettings()
# -- [remotes.NAME] and [gateway] (issue 15, helper gateway) -------------------------------------------

REMOTE_SERVICES = ("find", "move", "get")
GATEWAY_MODES = ("off", "forward", "fallback")


@dataclass(frozen=True)
class RemoteSettings:
    """``[remotes.NAME]``: a remote archive (PACS) the gateway forwards queries and retrieves to.

    ``move_destination`` is the AE title under which the remote knows *us* as a C-MOVE destination
    (its AE table maps it to our host and DICOM port); it must be an AE title we answer (ours or a
    partition's), default our ``[server] ae_title``.  ``known_destinations`` are AE titles the remote
    itself can C-MOVE to (``["*"]``: any): a C-MOVE to one of them is forwarded as is, any other is
    moved to us and relayed to the destination from our ``[peers]`` table.
    """

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    services: tuple[str, ...] = ("find", "move")
    move_destination: str = ""  # empty: our [server] ae_title
    known_destinations: tuple[str, ...] = ()
    connect_timeout: float = 10.0  # TCP connect + A-ASSOCIATE
    timeout: float = 60.0  # one DIMSE message (a C-FIND match, a C-MOVE/C-GET response, a sub-operation)
    find_timeout: float = 30.0  # a whole forwarded C-FIND: a slower remote is reported with a warning status
    max_associations: int = 4  # associations we keep open to it at once; more requests wait

    def offers(self, service: str) -> bool:
        return service in self.services

    def knows(self, destination: str) -> bool:
        return "*" in self.known_destinations or destination in self.known_destinations


@dataclass(frozen=True)
class GatewaySettings:
    """``[gateway]`` (main AE title) or ``[partitions.NAME.gateway]``: forward to remotes.

    ``mode``: ``"forward"`` answers C-FIND from the remotes (merged, de-duplicated) and retrieves from
    them; ``"fallback"`` answers locally and forwards only when nothing local matches; ``"off"``.
    ``cache``: keep the instances relayed from a remote in the archive (first tier).
    """

    remotes: tuple[str, ...] = ()
    mode: str = "off"
    cache: bool = False

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and bool(self.remotes)


_REMOTE_KEYS = {"ae_title", "host", "port", "tls", "services", "move_destination", "known_destinations", "connect_timeout",
                "timeout", "find_timeout", "max_associations"}


def _aet_list(where: str, value: object, *, star: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of AE titles, not {value!r}")
    return tuple(v.strip() if star and v.strip() == "*" else validate_ae_title(v, f"{where} entry") for v in value)


def remotes_from(raw: object) -> dict[str, RemoteSettings]:
    """Parse every ``[remotes.NAME]`` table (``move_destination`` empty: our ``[server] ae_title``, resolved when used)."""
    if not isinstance(raw, dict):
        raise ConfigError("[remotes] must hold one table per remote archive: [remotes.PACS1]")
    out: dict[str, RemoteSettings] = {}
    for name, r in raw.items():
        where = f"[remotes.{name}]"
        r = _check_keys(where, r, _REMOTE_KEYS)
        if "host" not in r or "port" not in r:
            raise ConfigError(f"{where} needs host and port")
        port = _int(f"{where} port", r["port"])
        if not 1 <= port <= 65535:
            raise ConfigError(f"{where} port {port} out of range")
        kw: dict[str, Any] = {}
        tls = r.get("tls", False)
        if not isinstance(tls, bool):
            raise ConfigError(f"{where} tls must be true or false, not {tls!r}")
        services = r.get("services", ["find", "move"])
        if not isinstance(services, list) or not services or any(s not in REMOTE_SERVICES for s in services):
            raise ConfigError(f"{where} services must be a non-empty list of {', '.join(REMOTE_SERVICES)}, not {services!r}")
        for key in ("connect_timeout", "timeout", "find_timeout"):
            if key in r:
                kw[key] = float(_number(f"{where} {key}", r[key]))
        if "max_associations" in r:
            n = _int(f"{where} max_associations", r["max_associations"])
            if not 1 <= n <= 64:
                raise ConfigError(f"{where} max_associations must be 1 to 64, not {n}")
            kw["max_associations"] = n
        out[name] = RemoteSettings(
            name=name,
            ae_title=validate_ae_title(str(r.get("ae_title", name)), f"{where} ae_title"),
            host=str(r["host"]),
            port=port,
            tls=tls,
            services=tuple(dict.fromkeys(services)),
            move_destination=validate_ae_title(str(r["move_destination"]), f"{where} move_destination") if "move_destination" in r else "",
            known_destinations=_aet_list(f"{where} known_destinations", r.get("known_destinations", []), star=True),
            **kw,
        )
    return out


def gateway_from(raw: object, where: str) -> GatewaySettings:
    """Parse ``[gateway]`` or ``[partitions.NAME.gateway]`` (absent: off)."""
    if raw is None:
        return GatewaySettings()
    table = _check_keys(where, raw, {"remotes", "mode", "cache"})
    remotes = table.get("remotes", [])
    if not isinstance(remotes, list) or not all(isinstance(v, str) and v for v in remotes):
        raise ConfigError(f'{where} remotes must be a list of [remotes.NAME] names, such as ["PACS1"], not {remotes!r}')
    mode = table.get("mode", "forward" if remotes else "off")
    if mode not in GATEWAY_MODES:
        raise ConfigError(f"{where} mode must be one of {', '.join(GATEWAY_MODES)}, not {mode!r}")
    cache = table.get("cache", False)
    if not isinstance(cache, bool):
        raise ConfigError(f"{where} cache must be true or false, not {cache!r}")
    return GatewaySettings(remotes=tuple(dict.fromkeys(remotes)), mode=mode, cache=cache)


def validate_gateway(s: Settings) -> None:
    """Every gateway names configured remotes; TLS remotes need our CA bundle; a remote's move destination is an AE we answer."""
    ours = {s.ae_title, *(p.ae_title for p in s.partitions.values())}
    for where, g in [("[gateway]", s.gateway), *((f"[partitions.{n}.gateway]", p.gateway) for n, p in s.partitions.items())]:
        for name in g.remotes:
            if name not in s.remotes:
                raise ConfigError(f"{where} remotes: {name!r} is not configured (add [remotes.{name}])")
        if g.mode != "off" and not g.remotes:
            raise ConfigError(f'{where} mode = "{g.mode}" needs remotes')
    for rule in s.hl7.prefetch:  # [[prefetch]] remotes: asked by C-FIND, fetched by C-MOVE or C-GET
        for name in rule.remotes or ():
            r = s.remotes.get(name)
            if r is None:
                raise ConfigError(f"[[prefetch]] {rule.name!r} remotes: {name!r} is not configured (add [remotes.{name}])")
            if not r.offers("find") or not (r.offers("move") or r.offers("get")):
                raise ConfigError(f"[[prefetch]] {rule.name!r} remotes: [remotes.{name}] must offer find and move or get")
    for r in s.remotes.values():
        if r.tls and s.tls.ca_certificates is None:
            raise ConfigError(f"[remotes.{r.name}] tls = true needs [tls] ca_certificates (to verify the remote)")
        if r.offers("move") and (r.move_destination or s.ae_title) not in ours and not s.dimse_policy.accept_any_called_aet:
            raise ConfigError(f"[remotes.{r.name}] move_destination {r.move_destination!r} is not an AE title we answer "
                              f"({', '.join(sorted(ours))}); the remote's C-STOREs would be rejected")


@dataclass(frozen=True)
class JpipSettings:
    """``[jpip]`` (issue 16): the JPIP server under ``/jpip`` of the HTTP service (xdsi.jpip.server).

    ``cache_bytes``: memory for codestreams (stored frames cut into bins, lossless encodings made on demand);
    ``max_sessions`` / ``session_idle_seconds``: JPIP channels (cnew/cid), files all worker processes share;
    ``openjpeg_tile_headers``: tile-header data-bins in the form OpenJPEG's JPIP client reads (its SOT body and
    SOD kept) instead of the form of ISO/IEC 15444-9 A.3.3 (marker segments only).
    """

    enabled: bool = False
    cache_bytes: int = 256 * 1024 * 1024
    max_sessions: int = 64
    session_idle_seconds: float = 300.0
    openjpeg_tile_headers: bool = False


def jpip_from(raw: object) -> JpipSettings:
    """Parse ``[jpip]``: enabled, cache_size (bytes or "256 MiB"), max_sessions, session_idle_seconds, openjpeg_tile_headers."""
    t = _check_keys("[jpip]", raw, {"enabled", "cache_size", "max_sessions", "session_idle_seconds", "openjpeg_tile_headers"})
    kw: dict[str, Any] = {}
    for key in ("enabled", "openjpeg_tile_headers"):
        if key in t:
            if not isinstance(t[key], bool):
                raise ConfigError(f"[jpip] {key} must be true or false, not {t[key]!r}")
            kw[key] = t[key]
    if "cache_size" in t:
        try:
            n = parse_size(t["cache_size"])
        except (TypeError, ValueError):
            n = None
        if n is None or n < 1024 * 1024:
            raise ConfigError(f"[jpip] cache_size must be a size of at least 1 MiB, not {t['cache_size']!r}")
        kw["cache_bytes"] = n
    if "max_sessions" in t:
        n = _int("[jpip] max_sessions", t["max_sessions"])
        if not 1 <= n <= 100000:
            raise ConfigError(f"[jpip] max_sessions must be 1 to 100000, not {n}")
        kw["max_sessions"] = n
    if "session_idle_seconds" in t:
        kw["session_idle_seconds"] = float(_number("[jpip] session_idle_seconds", t["session_idle_seconds"]))
    return JpipSettings(**kw)
