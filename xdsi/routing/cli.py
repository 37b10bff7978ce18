"""``xdsi route`` (send a study to a destination by hand) and the routing lines of ``xdsi status``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from xdsi.config import ConfigError, Settings, validate_ae_title


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("route", help="send a study to a peer or STOW-RS URL now (again), through the routing queue")
    common(p)
    p.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    p.add_argument("--to", required=True, metavar="PEER", help="an AE title with a [peers.AET] host and port, or an http(s):// STOW-RS base URL")
    p.add_argument("--transfer-syntax", default="", metavar="UID", help="send in this transfer syntax (default: as stored)")
    p.add_argument("--partition", metavar="NAME", help="the study is in this [partitions.NAME] (default: the main AE title)")


def _destination(settings: Settings, to: str) -> str:
    from xdsi.routing.settings import is_url

    if is_url(to):
        return to.rstrip("/")
    aet = validate_ae_title(to, "--to")
    if settings.peer(aet) is None:
        raise ConfigError(f"--to {aet}: no [peers.{aet}] table with host and port (or give an http(s):// STOW-RS URL)")
    return aet


def cmd_route(settings: Settings, args: argparse.Namespace) -> int:
    """Queue every instance of the study for the destination (sent or not before), send them now, print the outcome."""
    from pydicom.uid import UID

    from xdsi.cli import _open_archive
    from xdsi.routing.models import SENT
    from xdsi.routing.queue import RouteQueue
    from xdsi.routing.service import deliver_now
    from xdsi.uids import InvalidUID, validate_uid

    try:
        study = validate_uid(args.study)
    except InvalidUID as exc:
        print(f"xdsi route: {exc}", file=sys.stderr)
        return 2
    try:
        destination = _destination(settings, args.to)
    except ConfigError as exc:
        print(f"xdsi route: {exc}", file=sys.stderr)
        return 2
    if args.transfer_syntax and not UID(args.transfer_syntax).is_transfer_syntax:
        print(f"xdsi route: --transfer-syntax {args.transfer_syntax!r} is not a transfer syntax UID", file=sys.stderr)
        return 2
    if args.partition:
        if args.partition not in settings.partitions:
            print(f"xdsi route: no [partitions.{args.partition}]", file=sys.stderr)
            return 2
        settings = settings.for_partition(args.partition)
    archive = _open_archive(settings)
    try:
        q = RouteQueue(archive, settings.routes, settings.routing)
        pks = q.queue_study(study, destination, args.transfer_syntax)
        if not pks:
            print(f"xdsi route: study {study} is not in the archive (or is being sent to {destination} right now)", file=sys.stderr)
            return 1
        claimed = deliver_now(q, pks)
        rows = q.rows_for(pks)
    finally:
        archive.close()
    mine = {c.pk for c in claimed}
    sent = [r for r in rows if r.state == SENT and r.pk in mine]
    failed = [r for r in rows if r.state != SENT and r.pk in mine]
    print(f"study {study} to {destination}: {len(sent)} of {len(rows)} instance(s) sent"
          + (f", {len(rows) - len(mine)} being sent by another process" if len(mine) < len(rows) else ""))
    for r in failed:
        print(f"  {r.sop_instance_uid}: {r.last_error} (queued again, attempt {r.attempts})")
    return 0 if not failed else 1


def print_status(settings: Settings) -> None:
    """``xdsi status``: the routes, then per destination the queue depth, failures and the last error; then the same
    for each partition (its own index, its own queue)."""
    for r in settings.routes:
        conds = ", ".join(f"{c.key}={'|'.join(p.text for p in c.patterns)}" for c in r.conditions) or "every instance"
        extra = "".join([f", delay {r.delay}s" if r.delay else "", f", as {r.transfer_syntax}" if r.transfer_syntax else ""])
        print(f"route:      {r.name}: {conds} -> {', '.join(r.destinations)}{extra}")
    _print_queue(settings, "routing:   ", bool(settings.routes))
    for name in sorted(getattr(settings, "partitions", {}) or {}):
        try:
            part = settings.for_partition(name)
        except Exception as exc:  # a partition that cannot be resolved is shown as such, the others still are
            print(f"routing [{name}]: not readable ({exc.__class__.__name__}: {exc})")
            continue
        _print_queue(part, f"routing [{part.ae_title}]:", bool(part.routes), quiet_when_empty=True)


def _print_queue(settings: Settings, label: str, has_routes: bool, quiet_when_empty: bool = False) -> None:
    from xdsi.index.db import open_index
    from xdsi.routing.status import queue_status

    index = open_index(settings.effective_index_url)
    try:
        st = queue_status(index, settings)
    finally:
        index.dispose()
    if not st["destinations"]:
        if not quiet_when_empty or has_routes:
            print(f"{label} nothing queued" + ("" if has_routes else " (no [[routes]])"))
        return
    print(f"{label} {st['queued']} forward(s) queued, {st['failing']} failing, {st['given_up']} given up")
    for dest, d in st["destinations"].items():
        print(f"  {dest}: {d['queued']} queued ({d['failing']} failing), {d['sent']} sent, {d['given_up']} given up")
        if d["last_error"] and (d["failing"] or d["given_up"]):
            retry = d["next_attempt_at"]
            print(f"    last error {d['last_error_at']}: {d['last_error']}" + (f"; next attempt {retry[11:19]}Z" if retry else ""))
