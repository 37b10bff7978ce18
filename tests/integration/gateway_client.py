"""A pynetdicom SCU for the gateway tests, run inside the test's network namespace; prints one JSON object.

  python -m tests.integration.gateway_client find PORT AET LEVEL Key=Value...
  python -m tests.integration.gateway_client get PORT AET STUDY_UID [--cancel-after N] [--out DIR]

``find``: every Pending identifier (as {keyword: value}) and the final status and Error Comment.
``get``: the final status and sub-operation counts, and the SOP Instance UIDs received; with
``--cancel-after N`` a C-CANCEL is sent once N instances have arrived.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import StoragePresentationContexts, build_role
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet


def _final(st: Any) -> dict[str, Any]:
    return {
        "status": int(st.Status) if "Status" in st else None,
        "comment": str(st.get("ErrorComment", "") or ""),
        "remaining": st.get("NumberOfRemainingSuboperations"),
        "completed": st.get("NumberOfCompletedSuboperations"),
        "failed": st.get("NumberOfFailedSuboperations"),
        "warning": st.get("NumberOfWarningSuboperations"),
    }


def find(args: argparse.Namespace) -> dict[str, Any]:
    from pydicom.dataset import Dataset

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.dimse_timeout = ae.network_timeout = 60
    ds = Dataset()
    ds.QueryRetrieveLevel = args.level
    for kv in args.keys:
        k, _, v = kv.partition("=")
        setattr(ds, k, v)
    assoc = ae.associate("127.0.0.1", args.port, ae_title=args.aet)
    assert assoc.is_established, "association refused"
    matches = []
    out: dict[str, Any] = {}
    for st, ident in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
        if st.Status in (0xFF00, 0xFF01):
            matches.append({e.keyword: str(e.value) for e in ident if e.keyword})
        else:
            out = _final(st)
    assoc.release()
    out["matches"] = matches
    return out


def get(args: argparse.Namespace) -> dict[str, Any]:
    from pydicom.dataset import Dataset

    _config.STORE_RECV_CHUNKED_DATASET = False
    received: list[str] = []
    state = {"cancelled": False}
    holder: dict[str, Any] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(str(ds.SOPInstanceUID))
        if args.out:
            ds.save_as(Path(args.out) / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        if args.cancel_after and len(received) >= args.cancel_after and not state["cancelled"]:
            state["cancelled"] = True
            holder["assoc"].send_c_cancel(1, query_model=StudyRootQueryRetrieveInformationModelGet)
        return 0x0000

    ae = AE(ae_title="TESTSCU")
    ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in StoragePresentationContexts[:120]:
        if args.implicit_only:
            ae.add_requested_context(cx.abstract_syntax, [ImplicitVRLittleEndian])
        else:
            ae.add_requested_context(cx.abstract_syntax)
    roles = [build_role(cx.abstract_syntax, scp_role=True) for cx in StoragePresentationContexts[:120]]
    assoc = ae.associate("127.0.0.1", args.port, ae_title=args.aet, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established, "association refused"
    holder["assoc"] = assoc
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = args.study
    out: dict[str, Any] = {}
    pendings = 0
    for st, ident in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet, msg_id=1):
        if "Status" in st and st.Status == 0xFF00:
            pendings += 1
            continue
        out = _final(st)
        failed = ident.get("FailedSOPInstanceUIDList", []) if ident is not None else []
        out["failed_uids"] = [failed] if isinstance(failed, str) else [str(u) for u in failed]
    assoc.release()
    out["received"] = received
    out["pendings"] = pendings
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("find")
    f.add_argument("port", type=int)
    f.add_argument("aet")
    f.add_argument("level")
    f.add_argument("keys", nargs="*")
    g = sub.add_parser("get")
    g.add_argument("port", type=int)
    g.add_argument("aet")
    g.add_argument("study")
    g.add_argument("--cancel-after", type=int, default=0)
    g.add_argument("--out", default="")
    g.add_argument("--implicit-only", action="store_true")
    args = p.parse_args()
    result = find(args) if args.cmd == "find" else get(args)
    json.dump(result, sys.stdout, default=str)


if __name__ == "__main__":
    main()
