"""The ``xdsi`` command: thin wrappers that build the settings once and call services."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from xdsi import __version__
from xdsi.config import ConfigError, Settings, load_settings


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--data-dir", metavar="DIR", type=Path, help="data directory (default ./xdsi-data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdsi", description="IHE XDS-I.b Imaging Document Source and DICOM archive")
    parser.add_argument("--version", action="version", version=f"xdsi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the DICOM and HTTP servers")
    _common(p)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--dicom-port", type=int, metavar="N", help="DICOM port (default 11112)")
    p.add_argument("--http-port", type=int, metavar="N", help="HTTP port (default 8080)")
    p.add_argument("--dicom-tls-port", type=int, metavar="N", help="DICOM TLS port ([server] dicom_tls_port; needs [tls]; IANA 2762)")
    p.add_argument("--https-port", type=int, metavar="N", help="HTTPS port ([server] https_port; needs [tls])")
    p.add_argument("--ae-title", metavar="AET", help="our AE title (default XDSI)")
    p.add_argument("--repository-unique-id", metavar="OID", help="our XDS repositoryUniqueId ([xds] repository_unique_id)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes sharing the listeners ([server] workers; default: one per CPU; 1: one process, no supervisor)")

    p = sub.add_parser("import", help="import DICOM files and folders into the archive")
    _common(p)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("migrate", help="run the storage tier policy once")
    _common(p)

    p = sub.add_parser("status", help="print what the archive holds")
    _common(p)
    p.add_argument("--study", metavar="UID", help="XDS-I.b publishing state of one study: manifests, submissions, registry answers")

    p = sub.add_parser("publish", help="publish a study's manifest to the XDS registry now and print the answer")
    _common(p)
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--wait", type=float, default=120.0, metavar="SECONDS", help="how long to wait for the answer (default 120)")

    p = sub.add_parser("delete", help="delete a study, series or instances from the archive (index rows, then files)")
    _common(p)
    p.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    p.add_argument("--series", metavar="UID", help="only this series")
    p.add_argument("--instance", action="append", default=[], metavar="UID", help="only these SOP Instance UIDs (repeat)")
    p.add_argument("--yes", action="store_true", help="really delete; without it, only say what would go")

    p = sub.add_parser("retrieve", help="retrieve instances from an Imaging Document Source (RAD-69)")
    _common(p)
    p.add_argument("url", help="the Imaging Document Source endpoint, e.g. http://host:8080/xdsi/ImagingDocumentSource")
    p.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    p.add_argument("--series", metavar="UID", help="Series Instance UID of the --instance UIDs")
    p.add_argument("--instance", action="append", default=[], metavar="UID", help="SOP Instance UID (repeat)")
    p.add_argument("--manifest", type=Path, metavar="KOS", help="take series and instances of --study from a KOS manifest")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the retrieved files")
    p.add_argument("--repository-unique-id", metavar="OID", help="the source's repositoryUniqueId (default: ours, configured or generated in the data dir)")
    p.add_argument("--transfer-syntax", action="append", default=[], metavar="UID", help="acceptable transfer syntax (repeat; default explicit and implicit VR LE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("conformance", help="run the Connectathon Imaging Document Source cases against an IDS endpoint")
    _common(p)
    p.add_argument("url", help="the Imaging Document Source endpoint, e.g. http://host:8080/xdsi/ImagingDocumentSource")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--kos", type=Path, metavar="FILE", help="draw the UIDs from this KOS manifest (any IDS)")
    what.add_argument("--study", metavar="UID", help="draw the UIDs from this study, found by QIDO-RS on the target (or --local)")
    p.add_argument("--repository-unique-id", metavar="OID", help="the target's repositoryUniqueId (default: the KOS's Retrieve Location UID)")
    p.add_argument("--other-study", metavar="UID", help="another study the target holds, for ids_2018-4811 case 04 (default: found by QIDO-RS)")
    p.add_argument("--dicomweb", metavar="URL", help="DICOMweb root for --study (default: /dicomweb on the URL's host)")
    p.add_argument("--local", action="store_true", help="with --study: read the study from this installation's data directory")
    p.add_argument("--case", action="append", default=None, metavar="ID", help="run only this case (repeat)")
    p.add_argument("--max-documents", type=int, default=20, metavar="N", help="most documents per request (default 20)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="per request (default 120)")
    p.add_argument("--junit", type=Path, metavar="FILE", help="also write the results as JUnit XML")
    p.add_argument("--save", type=Path, metavar="DIR", help="keep every request and answer envelope, one folder per case")
    p.add_argument("--ca", type=Path, metavar="FILE", help="https: trust this CA bundle (e.g. the Connectathon's) instead of the system's")
    p.add_argument("--cert", type=Path, metavar="FILE", help="https: our client certificate (PEM), for ATNA mutual TLS")
    p.add_argument("--key", type=Path, metavar="FILE", help="https: the private key of --cert (PEM), if not in the same file")
    from xdsi.routing.cli import add_parser as _add_route_parser  # issue 15: `xdsi route`

    _add_route_parser(sub, _common)
    p = sub.add_parser("users", help="HTTP Basic users ([http] auth = \"basic\"): add, remove, list")
    _common(p)
    users = p.add_subparsers(dest="users_command", required=True)
    u = users.add_parser("add", help="add a user, or set its password and rights")
    u.add_argument("name", metavar="NAME")
    u.add_argument("--rights", required=True, metavar="LIST", help="comma list of read, write, admin")
    u.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin instead of asking")
    u = users.add_parser("remove", help="remove a user")
    u.add_argument("name", metavar="NAME")
    users.add_parser("list", help="the users and their rights")
    for u in users.choices.values():  # --config / --data-dir after the verb too; SUPPRESS keeps a value given before it
        u.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML configuration file")
        u.add_argument("--data-dir", metavar="DIR", type=Path, default=argparse.SUPPRESS, help="data directory (default ./xdsi-data)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    # flags go in before relative tier paths are resolved, so --data-dir moves them too
    s = load_settings(
        args.config,
        overrides=dict(
            data_dir=getattr(args, "data_dir", None),
            host=getattr(args, "host", None),
            dicom_port=getattr(args, "dicom_port", None),
            http_port=getattr(args, "http_port", None),
            dicom_tls_port=getattr(args, "dicom_tls_port", None),
            https_port=getattr(args, "https_port", None),
            ae_title=getattr(args, "ae_title", None),
            workers=getattr(args, "workers", None),
        ),
    )
    if getattr(args, "repository_unique_id", None):
        from dataclasses import replace

        s = s.with_overrides(xds=replace(s.xds, repository_unique_id=args.repository_unique_id.strip()))
    return s


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """One process (``workers = 1``), or a supervisor over N worker processes sharing the listeners."""
    from xdsi.heap import tune_allocator

    tune_allocator()  # this process (one worker); a supervisor's workers are fresh interpreters and do it themselves
    if settings.effective_workers > 1:
        from xdsi.supervisor import supervise

        return supervise(settings, verbose=bool(args.verbose))
    from xdsi.server import serve

    return serve(settings)


def _open_archive(settings: Settings):  # type: ignore[no-untyped-def]
    """The archive for a one-shot command; a data directory that cannot be created or written is one line, exit 2."""
    from xdsi.archive import Archive
    from xdsi.startup import check_directories

    check_directories(settings)
    return Archive.open(settings, clean=False)  # a running server may be writing: leave its temp files alone


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    """Import files and folders; report every path not imported with the reason, and carry on.

    Exit status 1 when a path named on the command line does not exist, a store failed on our
    side, or something that may be an instance could not be read (permission denied, I/O error);
    0 when everything skipped is certainly not an instance (text, DICOMDIR, dangling symlink, loop).
    """
    from tqdm import tqdm

    from xdsi.archive.store import Outcome
    from xdsi.importing import examine, rejection, walk

    missing = [p for p in args.paths if not os.path.lexists(p)]
    for p in missing:
        print(f"xdsi import: {p}: no such file or folder", file=sys.stderr)
    archive = _open_archive(settings)
    found = list(walk([p for p in args.paths if p not in missing], skip_dirs=[settings.data_dir]))
    files = [f.path for f in found if not f.problem]
    counts: Counter[str] = Counter()
    skipped: list[tuple[Path, str]] = [(f.path, f.problem) for f in found if f.problem]
    unreadable = sum(1 for f in found if f.unreadable)
    try:
        for path in tqdm(files, unit="file", disable=args.no_progress or None, desc="import"):
            ex = examine(path)
            if ex.skip:
                counts["unreadable" if ex.unreadable else "rejected"] += 1
                unreadable += ex.unreadable
                skipped.append((path, ex.skip))
                continue
            try:
                result = archive.store.store_file(path)
            except OSError as exc:  # the file went away or turned unreadable since examine()
                counts["unreadable"] += 1
                unreadable += 1
                skipped.append((path, f"cannot read: {exc.strerror or exc}"))
                continue
            counts[result.outcome.value] += 1
            if result.outcome is Outcome.REJECTED:
                skipped.append((path, rejection(ex, result.reason)))
            elif result.outcome is Outcome.FAILED:
                skipped.append((path, result.reason))
            elif result.outcome is Outcome.DUPLICATE:
                skipped.append((path, f"duplicate SOP Instance UID {result.sop_instance_uid}: {result.reason}"))
    finally:
        archive.close()
    others = len(skipped) - sum(counts[k] for k in ("rejected", "failed", "duplicate", "unreadable"))
    print(
        f"imported {counts['stored'] + counts['replaced']} of {len(files)} file(s): "
        f"{counts['stored']} new, {counts['replaced']} replaced, {counts['duplicate']} duplicate, "
        f"{counts['rejected']} not DICOM or invalid, {counts['failed']} failed"
        + (f", {counts['unreadable']} unreadable" if counts["unreadable"] else "")
        + (f"; {others} other path(s) skipped" if others else "")
    )
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    return 1 if counts["failed"] or missing or unreadable else 0


def _command_audit(settings: Settings, archive: Any, command: str) -> tuple[Any, list[Any]]:
    """The audit trail of a one-shot command, set on ``archive``, and who acts: (None, []) without [audit].

    The trail only spools (no sender is started): the server's sender delivers from the same
    spool, so a message is never sent by two processes (see :mod:`xdsi.audit.lifecycle`).
    """
    if not settings.audit.repositories:
        return None, []
    from xdsi.audit.lifecycle import operator, this_process
    from xdsi.audit.trail import AuditTrail

    trail = AuditTrail(settings)
    archive.audit = trail
    person = operator()
    actors = [p for p in (person, this_process(settings.ae_title, command, requestor=person is None)) if p is not None]
    return trail, actors


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:

    archive = _open_archive(settings)
    trail = None
    try:
        trail, archive.policy.audit_actors = _command_audit(settings, archive, "xdsi migrate")
        report = archive.policy.run_once()
    finally:
        archive.close()
        if trail is not None:
            trail.stop(drain_seconds=0)
    print(f"moved {report.moved_studies} stud(ies), {report.moved_files} file(s), {_human(report.moved_bytes)}")
    _print_migration_compression(report)
    for err in report.errors:
        print(f"error: {err}", file=sys.stderr)
    return 1 if report.errors else 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from xdsi.archive.lifecycle import archive_status
    from xdsi.dimse.spool import spool_usage

    if getattr(args, "study", None):
        return cmd_status_study(settings, args.study)
    archive = _open_archive(settings)
    try:
        st = archive_status(archive.index, archive.tiers)
        queued = archive.policy.plan()
    finally:
        archive.close()
    print(f"AE title:   {settings.ae_title}")
    _print_listeners(settings)
    _print_identifiers(settings, archive.settings)
    print(f"index:      {_redact(settings.effective_index_url)}")
    print(f"patients:   {st.patients}")
    print(f"studies:    {st.studies}")
    print(f"series:     {st.series}")
    print(f"instances:  {st.instances}")
    print("tiers:")
    for tier in archive.tiers:
        cfg = tier.settings
        marks = f", high {_human(cfg.high_watermark)} / low {_human(cfg.low_watermark)}" if cfg.high_watermark else ""
        age = f", migrate after {cfg.migrate_after_days:g} days" if cfg.migrate_after_days is not None else ""
        print(f"  {tier.name:<10} {_human(st.tier_bytes[tier.name]):>10} in {st.tier_files[tier.name]} file(s)  {tier.root}{marks}{age}")
        _print_tier_compression(tier.name, cfg.compress, st)
    spool = spool_usage(settings.temp_dir)
    print(f"spool:      {spool.files} file(s), {_human(spool.bytes)} in {settings.temp_dir}")
    print(f"queued:     {_queued(queued)}")
    _print_xds_queue(settings)
    _print_hl7(settings)
    from xdsi.routing.cli import print_status as _print_routing  # issue 15: routes, queue depth and failures

    _print_routing(settings)
    _print_remotes(settings)
    _print_audit_spool(settings)
    _print_clock(settings)
    return 0


def _print_listeners(settings: Settings) -> None:
    """Which listeners run (what a running ``xdsi serve`` recorded) and which this configuration turns on (issue 12).

    Flags given to ``xdsi serve`` are not flags of ``xdsi status``: the running server's own record
    is what it listens on; the configuration is what the next start would.
    """
    from xdsi.running import describe_listeners, read_running

    running = read_running(settings.data_dir)
    if running is None:
        print("serving:    not running")
    elif running.alive:
        print(f"serving:    pid {running.pid} since {running.started:%Y-%m-%dT%H:%M:%SZ} on {', '.join(running.listeners)}")
        if running.workers > 1:
            print(f"workers:    {running.workers} worker processes under pid {running.pid}")
    else:
        print(f"serving:    not running (pid {running.pid}, started {running.started:%Y-%m-%dT%H:%M:%SZ}, ended without "
              f"stopping cleanly; it listened on {', '.join(running.listeners)})")
    print(f"listeners:  {describe_listeners(settings)} (as configured)")


def _print_remotes(settings: Settings, timeout: float = 3.0) -> None:
    """``[remotes.NAME]`` with address, services and reachability by C-ECHO, and each AE title's gateway (issue 15).

    The remotes are probed in parallel, each with ``timeout`` seconds, so a dead PACS costs a few seconds
    of ``xdsi status``, not its configured connect timeout times the number of remotes."""
    from concurrent.futures import ThreadPoolExecutor

    from xdsi.gateway.remotes import probe

    if not settings.remotes:
        return
    tls = None
    if any(r.tls for r in settings.remotes.values()):
        from xdsi.security.tls import client_context

        tls = lambda: client_context(settings.tls, check_hostname=False)  # noqa: E731
    remotes = list(settings.remotes.values())
    with ThreadPoolExecutor(max_workers=min(16, len(remotes))) as pool:
        states = list(pool.map(lambda r: probe(r, settings, timeout, tls), remotes))
    print("remotes:")
    width = max(len(r.name) for r in remotes)
    for r, (state, ms) in zip(remotes, states):
        print(f"  {r.name:<{width}}  {r.ae_title}@{r.host}:{r.port}{' (TLS)' if r.tls else ''}  {', '.join(r.services)}  "
              f"{state} in {ms:.0f} ms")
    gateways = [(settings.ae_title, settings.gateway), *((p.ae_title, p.gateway) for p in settings.partitions.values())]
    for aet, g in gateways:
        if g.mode != "off" and g.remotes:
            print(f"  gateway {aet}: {g.mode} to {', '.join(g.remotes)}{' (cache)' if g.cache else ''}")
        else:
            print(f"  gateway {aet}: off")


def _print_hl7(settings: Settings) -> None:
    """The HIS/RIS interface in ``xdsi status`` (issue 15): the listener, the prefetch rules, their jobs and the last failures."""
    from xdsi.hl7.status import status_lines

    for line in status_lines(settings):
        print(line)


def _print_clock(settings: Settings) -> None:
    """Consistent Time: the clock offsets peers' HTTP Date headers showed (issue 12)."""
    from xdsi.security.clock import report

    for line in report(settings.data_dir):
        print(line)


def _print_audit_spool(settings: Settings) -> None:
    """The audit trail in ``xdsi status``: messages waiting per repository, the oldest, refusals (issue 12)."""
    from xdsi.audit.trail import spool_status

    st = spool_status(settings)
    if st is None:
        print("audit:      off (no [audit] repositories)")
        return
    oldest = f", oldest pending {st.oldest_pending:%Y-%m-%dT%H:%M:%SZ}" if st.oldest_pending else ""
    refused = f", {st.refused} refused (spool full)" if st.refused else ""
    print(f"audit:      {max(st.depth.values(), default=0)} message(s) pending{oldest}{refused}")
    for repo, n in st.depth.items():
        print(f"  {repo}: {n} pending")


def _print_identifiers(configured: Settings, resolved: Settings) -> None:
    """Our identifiers as published, and which were generated for this installation (issue 11)."""
    from xdsi.installation import FILE_NAME

    where = f"generated for this installation, {resolved.data_dir / FILE_NAME}"
    for label, key, what in (("repository", "repository_unique_id", "XDS-I.b repositoryUniqueId"), ("source id", "source_id", "XDSSubmissionSet.sourceId"),
                             ("uid root", "uid_root", "root of the UIDs of our manifests")):
        value = getattr(resolved.xds, key)
        print(f"{label + ':':<11} {value} ({what}" + ("" if getattr(configured.xds, key) else f"; {where}") + ")")
    print(f"public url: {resolved.public_url or '(not set: [server] public_url; manifests carry no Retrieve URL)'}")


def _queued(moves: list) -> str:  # type: ignore[type-arg]
    """One line for the studies the next ``xdsi migrate`` would move."""
    if not moves:
        return "nothing"
    routes = Counter(f"{m.source} -> {m.target}" for m in moves)
    detail = ", ".join(f"{route}: {n}" for route, n in routes.items())
    files = sum(m.files for m in moves)
    size = sum(m.size for m in moves)
    return f"{len(moves)} stud(ies), {files} file(s), {_human(size)} due to migrate ({detail})"


# -- XDS-I.b publishing (issue 4) -------------------------------------------------------------

def _print_xds_queue(settings: Settings) -> None:
    """The outbox in ``xdsi status``: counts, and every waiting submission with the registry's own error text."""
    from xdsi.index.db import open_index
    from xdsi.xds.outbox import Outbox

    if not settings.xds.enabled:
        print("outbox:     nothing (XDS publishing is off)")
        return
    index = open_index(settings.effective_index_url)
    try:
        outbox = Outbox(index, settings.xds)
        counts = outbox.counts()
        rows = outbox.open_rows()
    finally:
        index.dispose()
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "nothing"
    print(f"xds:        mode {settings.xds.mode}; submissions: {summary}")
    if not rows:
        print("outbox:     nothing")
    for r in rows:
        print(f"outbox:     study {r.study_uid} {r.kind} [{r.state}] attempt {r.attempts}, next {r.next_attempt_at:%Y-%m-%d %H:%M:%S}")
        if r.last_error:
            print(f"            last answer: {r.last_status}: {r.last_error}")


def cmd_status_study(settings: Settings, study_uid: str) -> int:
    from xdsi.uids import InvalidUID
    from xdsi.xds.events import publication_findings as code_findings
    from xdsi.xds.patients import publication_findings as patient_findings
    from xdsi.xds.publisher import study_report
    from xdsi.xds.recovery import publication_findings as registry_answer_findings

    archive = _open_archive(settings)
    try:
        report = study_report(archive, study_uid)
        # why a study is not (fully) published: its patient's identity, codes the domain lacks, what the registry's answers mean
        findings = [*patient_findings(archive, study_uid), *code_findings(archive, study_uid), *registry_answer_findings(archive, study_uid)]
    except InvalidUID as exc:
        print(f"xdsi status: {exc}", file=sys.stderr)
        return 2
    finally:
        archive.close()
    reg = report["registered"]
    print(f"study:      {study_uid}")
    if reg:
        print(f"registered: manifest {reg['kos']} entryUUID {reg['entry_uuid']} ({reg['status']}, {reg['at']:%Y-%m-%d %H:%M:%S})")  # type: ignore[index]
    else:
        print("registered: nothing")
    for sub_ in report["submissions"]:  # type: ignore[union-attr]
        print(
            f"submission {sub_['pk']}: {sub_['kind']} {sub_['kos']} [{sub_['state']}] {sub_['transaction'] or '-'} "
            f"{sub_['instances']} instance(s), {sub_['attempts']} attempt(s)"
            + (f", replaces {sub_['replaces']}" if sub_["replaces"] else "")
        )
        if sub_["status"]:
            print(f"  registry answer: {sub_['status']}" + (f": {sub_['error']}" if sub_["error"] else ""))
    for f in report["files"]:  # type: ignore[union-attr]
        print(f"kept:       {f}")
    for finding in findings:
        print("finding:    " + finding.replace("\n", "\n            "))
    if report["submissions"]:
        last = report["submissions"][-1]  # type: ignore[index]
        if last["response"]:
            print("last response:")
            print(last["response"])
    return 0


def cmd_publish(settings: Settings, args: argparse.Namespace) -> int:
    """Queue and send now; print the registry's answer; exit 0 only on Success."""
    from xdsi.index.xds_models import DONE
    from xdsi.uids import InvalidUID
    from xdsi.xds.manifest import NonConformantManifest
    from xdsi.xds.metadata import MetadataError
    from xdsi.xds.publisher import Publisher

    if not settings.xds.enabled:
        print("xdsi publish: [xds] mode is \"off\"; set it to \"repository\" or \"integrated\"", file=sys.stderr)
        return 2
    archive = _open_archive(settings)
    trail = None
    if settings.audit.repositories:  # the Export of what we send is audited here too (issue 12); spooled only:
        from xdsi.audit.trail import AuditTrail  # the server's sender delivers it, never two processes at once

        trail = archive.audit = AuditTrail(settings)
    from xdsi.security import clock

    clock.install(settings.data_dir)  # the registry's Date against our clock, for `xdsi status`
    try:
        outcome = Publisher(archive).publish_now(args.study_uid, wait=args.wait)
    except (InvalidUID, NonConformantManifest, MetadataError) as exc:
        print(f"xdsi publish: {exc}", file=sys.stderr)
        return 2
    finally:
        archive.close()
        if trail is not None:
            trail.stop(drain_seconds=0)
    if outcome is None:
        print(f"xdsi publish: study {args.study_uid} is not in the archive and has no registered manifest", file=sys.stderr)
        return 1
    print(f"study {outcome.study_uid}: {outcome.transaction or 'submission'} {outcome.state}")
    print(f"registry status: {outcome.status}")
    if outcome.errors:
        print(f"registry errors: {outcome.errors}")
    return 0 if outcome.state == DONE else 1


def _redact(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_retrieve(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from xdsi.soap.client import DEFAULT_SYNTAXES, retrieve, series_from_manifest
    from xdsi.uids import is_valid_uid

    series: dict[str, list[str]] = {}
    if args.manifest:
        series = series_from_manifest(args.manifest, args.study)
    if args.instance:
        if not args.series:
            print("xdsi retrieve: --instance needs --series (RAD-69 names study, series and instance)", file=sys.stderr)
            return 2
        series.setdefault(args.series, []).extend(args.instance)
    if not series:
        print("xdsi retrieve: name the instances with --series/--instance or --manifest", file=sys.stderr)
        return 2
    for uid in [args.study, *series, *(i for v in series.values() for i in v)]:
        if not is_valid_uid(uid):
            print(f"xdsi retrieve: {uid!r} is not a valid UID", file=sys.stderr)
            return 2
    repository = args.repository_unique_id or _our_repository_unique_id(settings)
    if not repository:
        print("xdsi retrieve: give --repository-unique-id (the source's repositoryUniqueId, the Retrieve Location UID of its "
              "manifests); this installation has none configured or generated to default to", file=sys.stderr)
        return 2
    total = sum(len(v) for v in series.values())
    session = None
    if args.url.lower().startswith("https://"):  # [tls]: our certificate, the source verified against ca_certificates
        import requests

        from xdsi.security.tls import https_session

        session = https_session(settings.tls)
    with tqdm(total=None, unit="B", unit_scale=True, disable=args.no_progress or None, desc=f"{total} instance(s)") as bar:
        try:
            report = retrieve(
                args.url,
                args.study,
                series,
                args.out,
                repository_unique_id=repository,
                transfer_syntaxes=args.transfer_syntax or DEFAULT_SYNTAXES,
                progress=bar.update,
                session=session,
            )
        except Exception as exc:
            if session is None or not isinstance(exc, requests.exceptions.SSLError):
                raise
            print(f"xdsi retrieve: TLS with {args.url} failed: {exc}", file=sys.stderr)
            return 1
    if report.fault:
        print(f"SOAP fault: {report.fault}", file=sys.stderr)
        return 1
    print(f"{report.status.rsplit(':', 1)[-1]}: saved {len(report.saved)} of {total} file(s), {_human(report.bytes)} in {args.out}")
    for e in report.errors:
        print(f"error {e.error_code} at {e.location or '-'}: {e.code_context}", file=sys.stderr)
    return 0 if report.saved and not report.errors else 1


def _our_repository_unique_id(settings: Settings) -> str:
    """Ours as configured, or as generated in the data dir; "" when neither (nothing is created for a client command)."""
    from xdsi.installation import load

    if settings.xds.repository_unique_id:
        return settings.xds.repository_unique_id
    ids = load(settings.data_dir)
    return ids.repository_unique_id if ids else ""


def cmd_conformance(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when every case passes (skips allowed), 1 on any failure, 2 when the UIDs cannot be found."""
    from xdsi.conformance.cases import by_id
    from xdsi.conformance.report import failed, print_table, write_junit
    from xdsi.conformance.runner import run
    from xdsi.conformance.subject import SubjectError, dicomweb_base, from_archive, from_dicomweb, from_kos
    from xdsi.uids import InvalidUID, validate_uid

    import requests

    unknown = [c for c in args.case or [] if c not in by_id()]
    if unknown:
        print(f"xdsi conformance: unknown case(s) {unknown}; known: {', '.join(by_id())}", file=sys.stderr)
        return 2
    session = requests.Session()  # one TLS setup for QIDO-RS, WADO-RS and every SOAP exchange
    if args.ca:
        session.verify = str(args.ca)
    if args.cert:
        session.cert = (str(args.cert), str(args.key)) if args.key else str(args.cert)
    try:
        if args.repository_unique_id:
            args.repository_unique_id = validate_uid(args.repository_unique_id.strip(), "repositoryUniqueId")
        if args.kos:
            subject = from_kos(args.kos, args.repository_unique_id)
        elif args.local:
            archive = _open_archive(settings)
            try:
                subject = from_archive(archive.index, args.study, args.repository_unique_id or archive.settings.xds.repository_unique_id)  # generated ids filled in
            finally:
                archive.close()
        else:
            subject = from_dicomweb(args.dicomweb or dicomweb_base(args.url), args.study, args.repository_unique_id, session=session, timeout=args.timeout)
    except (SubjectError, InvalidUID) as exc:
        print(f"xdsi conformance: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # requests' connection errors are OSErrors too
        print(f"xdsi conformance: cannot read the study: {exc}", file=sys.stderr)
        return 2
    if args.other_study:
        try:
            subject.other_study_uid = validate_uid(args.other_study, "Study Instance UID")
        except InvalidUID as exc:
            print(f"xdsi conformance: {exc}", file=sys.stderr)
            return 2
    n = sum(len(v) for v in subject.series.values())
    header = (
        f"target:     {args.url}\nstudy:      {subject.study_uid} ({len(subject.series)} series, {n} instance(s); {subject.source})\n"
        f"repository: {subject.repository_unique_id}"
    )
    results = run(args.url, subject, case_ids=args.case, max_documents=max(1, args.max_documents), timeout=args.timeout, evidence=args.save, session=session)
    print_table(results, sys.stdout, header=header)
    if args.junit:
        write_junit(results, args.junit, properties={"url": args.url, "study": subject.study_uid, "repositoryUniqueId": subject.repository_unique_id})
    return 1 if failed(results) else 0


def cmd_delete(settings: Settings, args: argparse.Namespace) -> int:
    """Delete from the archive; a published study then gets a replacement manifest, or its manifest deprecated."""
    from xdsi.uids import InvalidUID, validate_uid

    try:
        study = validate_uid(args.study, "Study Instance UID")
        series = [validate_uid(args.series, "Series Instance UID")] if args.series else []
        sops = [validate_uid(u, "SOP Instance UID") for u in args.instance]
    except InvalidUID as exc:
        print(f"xdsi delete: {exc}", file=sys.stderr)
        return 2
    archive = _open_archive(settings)
    trail = None
    try:
        refs = archive.retrieve.select(study_uids=[study], series_uids=series, sop_uids=sops)
        if not refs:
            print("xdsi delete: nothing in the archive matches", file=sys.stderr)
            return 1
        size = sum(r.size for r in refs)
        if not args.yes:
            print(f"would delete {len(refs)} instance(s), {_human(size)}; run again with --yes to delete")
            return 0
        trail, actors = _command_audit(settings, archive, "xdsi delete")
        removed = archive.remove.remove([r.sop_instance_uid for r in refs], actors=actors)
    finally:
        archive.close()
        if trail is not None:
            trail.stop(drain_seconds=0)
    print(f"deleted {removed} instance(s), {_human(size)}")
    return 0


def cmd_users(settings: Settings, args: argparse.Namespace) -> int:
    """``xdsi users add|remove|list``: the users file of ``[http] auth = "basic"`` (argon2id hashes, never a password)."""
    from xdsi.security.users import UsersError, add_user, parse_rights, read_users, remove_user
    from xdsi.web.auth import users_path

    path = users_path(settings)
    try:
        if args.users_command == "list":
            users = read_users(path) if path.exists() else {}
            for u in users.values():
                print(f"{u.name}\t{','.join(sorted(u.rights))}")
            if not users:
                print(f"no users in {path}", file=sys.stderr)
            return 0
        if args.users_command == "remove":
            if not remove_user(path, args.name):
                print(f"xdsi users: no user {args.name!r} in {path}", file=sys.stderr)
                return 1
            print(f"removed {args.name} from {path}")
            return 0
        rights = parse_rights(args.rights)
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            import getpass

            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                print("xdsi users: the passwords differ", file=sys.stderr)
                return 2
        new = add_user(path, args.name, password, rights)
    except UsersError as exc:
        print(f"xdsi users: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"xdsi users: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{'added' if new else 'updated'} {args.name} ({','.join(sorted(rights))}) in {path}")
    return 0


def cmd_route(settings: Settings, args: argparse.Namespace) -> int:
    """``xdsi route --study UID --to PEER`` (issue 15): in xdsi.routing.cli."""
    from xdsi.routing.cli import cmd_route as run

    return run(settings, args)


COMMANDS = {
    "serve": cmd_serve,
    "import": cmd_import,
    "migrate": cmd_migrate,
    "status": cmd_status,
    "publish": cmd_publish,
    "delete": cmd_delete,
    "retrieve": cmd_retrieve,
    "conformance": cmd_conformance,
    "users": cmd_users,
    "route": cmd_route,
}


def configure_logging(settings: Settings, verbose: bool, name: str = "") -> None:
    """The log format and levels of every xdsi process; ``name`` (``w1``) tells a worker's lines apart."""
    level = logging.DEBUG if verbose else getattr(logging, settings.log_level.upper(), logging.INFO)
    who = f"[{name}] " if name else ""  # before the level: "INFO xdsi.dimse.server: ..." reads the same from any worker
    logging.basicConfig(level=level, format=f"%(asctime)s {who}%(levelname)s %(name)s: %(message)s")
    if not verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"xdsi: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings, bool(args.verbose))
    from xdsi.startup import StartupError

    try:
        return COMMANDS[args.command](settings, args)
    except StartupError as exc:  # a port or directory the operator must fix: one line, like ConfigError
        print(f"xdsi: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # found only once the data dir is open (a damaged installation.toml)
        print(f"xdsi: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _print_tier_compression(name: str, method: str | None, st: object) -> None:
    """Under a tier's line: its ``compress`` setting and the bytes lossless compression saves there (issue 16)."""
    compressed = getattr(st, "tier_compressed", {}).get(name, 0)
    if not method and not compressed:
        return
    saved = getattr(st, "tier_saved", {}).get(name, 0)
    setting = f"compress {method}" if method else "no compress setting"
    print(f"  {'':<10} {setting}: {compressed} file(s) stored compressed, {_human(saved)} saved")


def _print_migration_compression(report: object) -> None:
    """What ``xdsi migrate`` compressed onto a tier with ``compress``, and why the rest moved unchanged."""
    n = getattr(report, "compressed_files", 0)
    unchanged = getattr(report, "unchanged", {})
    if n:
        before, after = report.bytes_before, report.bytes_after  # type: ignore[attr-defined]
        print(f"compressed {n} file(s): {_human(before)} -> {_human(after)} ({before / max(after, 1):.2f}x)")
    for why, count in sorted(unchanged.items()):
        print(f"unchanged {count} file(s): {why}")
