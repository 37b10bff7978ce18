#!/usr/bin/env python3
"""Study-level C-FIND latency: M queries from pynetdicom against a real ``xdsi serve`` indexing N studies.

    .venv/bin/python bench/find.py [-n 1000] [-m 200] [--pg | --index-url URL]

The studies are written straight into the index through the catalog (one
series, one instance each, no pixel files): this measures matching, not
ingest.  Queries rotate through Patient ID (exact), Patient Name (wildcard)
and Study Date (one-month range), all over one association; each latency is
one C-FIND from request to final status, every response received.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_index_options, bench, machine, median, percentile  # noqa: E402

FAMILY = ["SMITH", "JONES", "MÜLLER", "GARCIA", "NGUYEN", "KOWALSKI", "ROSSI", "DUBOIS", "TANAKA", "SILVA",
          "JOHNSON", "BROWN", "MARTIN", "LEE", "WALKER", "HALL", "YOUNG", "KING", "WRIGHT", "SCOTT"]
GIVEN = ["ANNA", "JOHN", "MARIA", "PETER", "LUCIA", "TOM", "EVA", "SAM"]
MODALITIES = ["CT", "MR", "US", "CR", "DX", "MG", "PT", "NM"]


def populate(index_url: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Index n studies for n/2 patients; returns (patient id, patient name) of each patient."""
    from xdsi.archive.header import InstanceHeader
    from xdsi.index import catalog
    from xdsi.index.db import open_index
    from xdsi.uids import new_uid

    patients = [(f"P{i:06d}", f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}") for i in range(max(1, n // 2))]
    index = open_index(index_url)
    try:
        batch = 250
        for start in range(0, n, batch):
            with index.session() as s:
                for i in range(start, min(n, start + batch)):
                    pid, name = patients[i % len(patients)]
                    study, series, sop = new_uid(), new_uid(), new_uid()
                    date = f"{rng.randint(2015, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
                    h = InstanceHeader(
                        patient_id=pid, issuer_of_patient_id="BENCH", patient_name=name, birth_date="19700101", sex="O",
                        study_uid=study, study_date=date, study_time=f"{rng.randint(7, 18):02d}{rng.randint(0, 59):02d}00",
                        accession_number=f"A{i:08d}", accession_issuer="", study_id=str(i), study_description="BENCH STUDY",
                        referring_physician="REF^DOC", procedure_code=None, series_uid=series,
                        modality=rng.choice(MODALITIES), series_number=1, series_description="", body_part="",
                        series_date=date, series_time="", institution_name="", station_name="",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=sop,
                        transfer_syntax_uid="1.2.840.10008.1.2.1", instance_number=1, number_of_frames=None,
                        content_date=date, content_time="", rows=512, columns=512, has_file_meta=True,
                    )
                    copy = catalog.CopyRecord("cache", f"{study}/{series}/{sop}.dcm", 526000, "0" * 64, h.transfer_syntax_uid)
                    catalog.record_instance(s, h, copy, source_ae="BENCH")
    finally:
        index.dispose()
    return patients


def queries(m: int, patients: list[tuple[str, str]], rng: random.Random):  # type: ignore[no-untyped-def]
    from pydicom.dataset import Dataset

    for i in range(m):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for kw in ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
                   "StudyInstanceUID", "ModalitiesInStudy"):
            setattr(ds, kw, "")
        ds.NumberOfStudyRelatedInstances = None
        kind = ("id", "name", "date")[i % 3]
        if kind == "id":
            ds.PatientID = rng.choice(patients)[0]
        elif kind == "name":
            ds.PatientName = rng.choice(FAMILY)[:3] + "*"
        else:
            y, mth = rng.randint(2015, 2024), rng.randint(1, 12)
            ds.StudyDate = f"{y}{mth:02d}01-{y}{mth:02d}28"
        yield kind, ds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1000, help="studies to index (default 1000)")
    p.add_argument("-m", type=int, default=200, help="C-FIND requests to time (default 200)")
    p.add_argument("--seed", type=int, default=1)
    add_index_options(p)
    args = p.parse_args(argv)

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from xdsi.dimse.server import set_nodelay

    rng = random.Random(args.seed)
    with bench(args, "find") as b:
        t0 = time.perf_counter()
        patients = populate(b.index_url, args.n, rng)
        print(f"indexed {args.n} studies of {len(patients)} patients in {time.perf_counter() - t0:.1f} s")
        server = b.serve()
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        # the SCU switches Nagle off too, or each request waits ~40 ms for a delayed ACK on loopback
        nodelay = (evt.EVT_CONN_OPEN, lambda e: set_nodelay(e.assoc.dul.socket.socket))
        assoc = ae.associate(server.host, server.dicom_port, ae_title=server.ae_title, evt_handlers=[nodelay])
        if not assoc.is_established:
            print("association rejected or aborted\n" + server.output(), file=sys.stderr)
            return 1
        latencies: dict[str, list[float]] = {"id": [], "name": [], "date": []}
        matches = 0
        try:
            for kind, ds in queries(args.m, patients, rng):
                t = time.perf_counter()
                final = None
                for status, ident in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
                    if status is None:
                        raise RuntimeError("C-FIND: no response (timeout or abort)")
                    if status.Status in (0xFF00, 0xFF01):
                        matches += 1
                    else:
                        final = status.Status
                latencies[kind].append((time.perf_counter() - t) * 1000)
                if final != 0x0000:
                    raise RuntimeError(f"C-FIND ended with status 0x{final:04X}")
        finally:
            assoc.release()
            ae.shutdown()
        every = [x for v in latencies.values() for x in v]
        per_kind = ", ".join(f"{k} {median(v):.1f}" for k, v in latencies.items() if v)
        summary = (
            f"find: {args.m} study-level C-FINDs over {args.n} studies, {b.backend} index, pynetdicom SCU, 1 association: "
            f"median {median(every):.1f} ms, p95 {percentile(every, 95):.1f} ms, {matches / len(every):.1f} matches/query "
            f"(median by key: {per_kind} ms) [{machine()}]"
        )
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
