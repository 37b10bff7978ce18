#!/usr/bin/env python3
"""Study-level C-FIND latency: M queries from pynetdicom against a real ``xdsi serve`` indexing N studies.

    .venv/bin/python bench/find.py [-n 1000] [-m 200] [--pg | --index-url URL]
    ip netns exec NS .venv/bin/python bench/find.py --orthanc-port 24342 [--rounds 3]
    .venv/bin/python bench/find.py --pg-1m [--studies 20000 --instances 50] [--pg-cache DIR]

With ``--orthanc-port`` (an Orthanc started by ../shared/peers/start_orthanc.sh, run
the bench inside its network namespace) the same studies are also C-STORed into
Orthanc (headers only, no pixels) and dcmtk ``findscu`` queries both servers in
alternating rounds: the marginal time per query inside one association
(``findscu --repeat K`` minus ``--repeat 1``, divided by K-1; K large enough, 201 for a
Patient ID, that findscu's own start-up noise is spread thin on a loaded machine) for a Patient ID,
a Patient Name wildcard and all studies, with xdsi's figure, Orthanc's and the ratio.

The studies are written straight into the index through the catalog (one
series, one instance each, no pixel files): this measures matching, not
ingest.

``--pg-1m`` measures at scale instead: a PostgreSQL index of ``--studies`` studies (two series
each) of ``--instances`` instances, 1 M instance rows by default, generated with COPY (rows only:
no files, no file copies; the study/series aggregates set as the catalog keeps them).  The server
and its data folder are kept in ``--pg-cache`` (default /tmp/xdsi-bench-find-pg1m), so only the
first run pays the ~minutes of building; later runs start that PostgreSQL and query.  It prints
findscu's marginal time per query for a Patient ID, a Patient Name wildcard and all studies, then
the median latency of pynetdicom C-FINDs (Patient ID, name, date range).  Queries rotate through Patient ID (exact), Patient Name (wildcard)
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


def populate(index_url: str, n: int, rng: random.Random, headers: list | None = None) -> list[tuple[str, str]]:
    """Index n studies for n/2 patients; returns (patient id, patient name) of each patient.

    ``headers``, when given, receives each InstanceHeader so that a peer can be loaded with the same studies.
    """
    from xdsi.archive.header import InstanceHeader
    from xdsi.index import catalog
    from xdsi.index.db import open_index

    patients = [(f"P{i:06d}", f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}") for i in range(max(1, n // 2))]
    index = open_index(index_url)
    try:
        batch = 250
        for start in range(0, n, batch):
            with index.session() as s:
                for i in range(start, min(n, start + batch)):
                    pid, name = patients[i % len(patients)]
                    # UIDs from the seeded generator: a peer already loaded by an earlier run holds the same studies
                    study, series, sop = (f"2.25.{rng.getrandbits(120)}" for _ in range(3))
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
                    if headers is not None:
                        headers.append(h)
                    copy = catalog.CopyRecord("cache", f"{study}/{series}/{sop}.dcm", 526000, "0" * 64, h.transfer_syntax_uid)
                    catalog.record_instance(s, h, copy, source_ae="BENCH")
    finally:
        index.dispose()
    return patients


class CachedPostgres:
    """A PostgreSQL server whose data folder outlives the run (``--pg-1m`` builds its index once).

    Same set-up as tests/support/postgres.py (loopback only, trust auth, run as ``postgres`` when
    we are root), but :meth:`stop` leaves the folder for the next run.
    """

    def __init__(self, root: Path) -> None:
        import os
        import pwd

        from tests.support.postgres import _bindir, _free_port

        self.bindir = _bindir()
        self.root = root
        self.data = root / "data"
        self.port = _free_port()
        self.user = "xdsi"
        self._as: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, check: bool = True) -> None:
        import subprocess

        subprocess.run([*self._as, *args], check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")

    def start(self) -> "CachedPostgres":
        import socket

        if not (self.data / "PG_VERSION").exists():
            self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        elif (self.data / "postmaster.pid").exists():  # left running by an interrupted run
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                "-c max_connections=100 -c shared_buffers=256MB")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not start")

    def conninfo(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def database(self, name: str) -> str:
        """The SQLAlchemy URL of database ``name``, created if missing."""
        import psycopg

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)


_UID_ROOT = "1.2.826.0.1.3680043.8.498.14"  # pydicom's root + this bench: 1=patient 2=study 3=series 4=instance


def scale_patients(studies: int, seed: int) -> list[tuple[str, str]]:
    """(Patient ID, name) of the ``--pg-1m`` index's patients: two studies each."""
    rng = random.Random(seed)
    return [(f"Q{i:07d}", f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}") for i in range(max(1, studies // 2))]


def build_scale_index(pg: CachedPostgres, url: str, studies: int, instances: int, seed: int) -> None:
    """Generate the ``--pg-1m`` rows with COPY: ``studies`` studies of two series, ``instances`` instances each.

    Aggregates (study.num_series/num_instances, series.num_instances, study.modalities) are written
    as the catalog keeps them; tests/unit/test_query_encoded.py checks the catalog's own bookkeeping.
    """
    from datetime import datetime, timezone

    import psycopg

    from xdsi.index.db import open_index

    open_index(url).dispose()  # the schema, by the migrations
    patients = scale_patients(studies, seed)
    rng = random.Random(seed + 1)
    now = datetime(2026, 11, 30, tzinfo=timezone.utc)
    conninfo = pg.conninfo(url.rsplit("/", 1)[1])
    per_series = [instances - instances // 2, instances // 2]
    with psycopg.connect(conninfo) as conn:
        for table in ("file_copy", "instance", "series", "study", "patient"):
            conn.execute(f"DELETE FROM {table}")
        with conn.cursor().copy("COPY patient (pk, patient_id, issuer_of_patient_id, scope_study_uid, patient_name, "
                                "patient_name_norm, birth_date, sex, created_at) FROM STDIN") as cp:
            for i, (pid, name) in enumerate(patients, start=1):
                cp.write_row((i, pid, "BENCH", "", name, name.upper(), "19700101", "O", now))
        study_rows, series_rows = [], []
        for st in range(1, studies + 1):
            p = (st - 1) % len(patients)
            pid, name = patients[p]
            date = f"{rng.randint(2015, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            mods = rng.sample(MODALITIES, 2)
            study_rows.append((st, p + 1, f"{_UID_ROOT}.2.{st}", name, name.upper(), "19700101", "O", date,
                               f"{rng.randint(7, 18):02d}{rng.randint(0, 59):02d}00", f"B{st:08d}", "", str(st),
                               "BENCH STUDY", "REF^DOC", "", "", "", "\\".join(sorted(mods)), now, now, 2, instances))
            for k in range(2):
                se = 2 * (st - 1) + k + 1
                series_rows.append((se, st, f"{_UID_ROOT}.3.{se}", mods[k], k + 1, "", "", date, "", "", "", now,
                                    per_series[k]))
        with conn.cursor().copy("COPY study (pk, patient_fk, study_uid, patient_name, patient_name_norm, patient_birth_date, "
                                "patient_sex, study_date, study_time, accession_number, accession_issuer, study_id, "
                                "study_description, referring_physician, procedure_code_value, procedure_code_scheme, "
                                "procedure_code_meaning, modalities, created_at, updated_at, num_series, num_instances) "
                                "FROM STDIN") as cp:
            for row in study_rows:
                cp.write_row(row)
        with conn.cursor().copy("COPY series (pk, study_fk, series_uid, modality, series_number, series_description, "
                                "body_part, series_date, series_time, institution_name, station_name, created_at, "
                                "num_instances) FROM STDIN") as cp:
            for row in series_rows:
                cp.write_row(row)
        with conn.cursor().copy("COPY instance (pk, series_fk, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                                "instance_number, number_of_frames, content_date, content_time, rows, columns, "
                                "source_ae_title, created_at) FROM STDIN") as cp:
            ipk = 0
            for se, _st, _uid, _mod, _num, _d1, _b, date, *_rest, count in series_rows:
                for n in range(count):
                    ipk += 1
                    cp.write_row((ipk, se, f"{_UID_ROOT}.4.{ipk}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                  n + 1, None, date, "", 512, 512, "BENCH", now))
        for table in ("patient", "study", "series", "instance"):
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'), (SELECT max(pk) FROM {table}))")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def xdsi_marginal(port: int, aet: str, queries_: dict[str, tuple[Path, int]], rounds: int) -> list[str]:
    """findscu's marginal ms per query against xdsi alone (the ``--pg-1m`` index is not loaded into a peer)."""
    lines = []
    for kind, (path, k) in queries_.items():
        per, m = [], 0
        for _ in range(rounds):
            t1, _m = findscu(port, aet, path, 1)
            tk, m = findscu(port, aet, path, k)
            per.append((tk - t1) / (k - 1) * 1000)
        lines.append(f"  {kind:<5} xdsi {median(per):8.1f} ms  (matches {m}; rounds " + ", ".join(f"{v:.1f}" for v in per) + ")")
    return lines


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


FINDSCU = "/usr/bin/findscu"


def _study_dataset(h):  # type: ignore[no-untyped-def]
    """A header-only CT instance carrying the same study attributes the index was given."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = h.sop_class_uid, h.sop_instance_uid
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = h.patient_name, h.patient_id, h.issuer_of_patient_id
    ds.PatientBirthDate, ds.PatientSex = h.birth_date, h.sex
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = h.study_uid, h.study_date, h.study_time
    ds.AccessionNumber, ds.StudyID, ds.StudyDescription = h.accession_number, h.study_id, h.study_description
    ds.ReferringPhysicianName = h.referring_physician
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = h.series_uid, h.modality, h.series_number
    ds.InstanceNumber, ds.Rows, ds.Columns = h.instance_number, h.rows, h.columns
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def load_peer(port: int, aet: str, headers: list) -> None:  # type: ignore[type-arg]
    """C-STORE the benchmark's studies into the peer over one association."""
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(headers[0].sop_class_uid, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise RuntimeError(f"peer {aet} at {port}: association refused")
    try:
        for h in headers:
            st = assoc.send_c_store(_study_dataset(h))
            if st is None or st.Status != 0:
                raise RuntimeError(f"peer C-STORE failed: {st}")
    finally:
        assoc.release()
        ae.shutdown()


def _query_file(folder: Path, name: str, **keys: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for kw in ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
               "StudyInstanceUID", "ModalitiesInStudy"):
        setattr(ds, kw, keys.get(kw, ""))
    ds.NumberOfStudyRelatedInstances = None
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Q/R Find
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def findscu(port: int, aet: str, query: Path, repeat: int) -> tuple[float, int]:
    """Seconds for one findscu run of ``repeat`` identical queries on one association, and matches per query."""
    import subprocess

    cmd = [FINDSCU, "-v", "-S", "-aec", aet, "--repeat", str(repeat), "127.0.0.1", str(port), str(query)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env={"TCP_NODELAY": "1"}, timeout=600)
    elapsed = time.perf_counter() - t
    log = out.stdout + out.stderr
    if out.returncode != 0 or "Final Find Response" not in log:
        raise RuntimeError(f"findscu against {aet}:{port} failed ({out.returncode}):\n{log[-2000:]}")
    return elapsed, log.count("(Pending)") // repeat


def compare(xdsi: tuple[int, str], peer: tuple[int, str], queries_: dict[str, tuple[Path, int]], rounds: int) -> list[str]:
    """Marginal ms per query for xdsi and the peer, alternating rounds; medians over rounds."""
    per: dict[tuple[str, str], list[float]] = {}
    matches: dict[tuple[str, str], int] = {}
    for _ in range(rounds):
        for kind, (path, k) in queries_.items():
            for who, (port, aet) in (("xdsi", xdsi), ("orthanc", peer)):
                t1, _m = findscu(port, aet, path, 1)
                tk, m = findscu(port, aet, path, k)
                per.setdefault((kind, who), []).append((tk - t1) / (k - 1) * 1000)
                matches[(kind, who)] = m
    lines = []
    for kind in queries_:
        x, o = median(per[(kind, "xdsi")]), median(per[(kind, "orthanc")])
        lines.append(
            f"  {kind:<5} xdsi {x:8.1f} ms  orthanc {o:8.1f} ms  ratio xdsi/orthanc {x / o:5.2f}"
            f"  (matches {matches[(kind, 'xdsi')]} / {matches[(kind, 'orthanc')]}; xdsi rounds "
            + ", ".join(f"{v:.1f}" for v in per[(kind, "xdsi")]) + "; orthanc "
            + ", ".join(f"{v:.1f}" for v in per[(kind, "orthanc")]) + ")"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1000, help="studies to index (default 1000)")
    p.add_argument("-m", type=int, default=200, help="C-FIND requests to time (default 200)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--orthanc-port", type=int, help="also load and query this Orthanc (findscu, same run)")
    p.add_argument("--orthanc-aet", default="ORTHANC")
    p.add_argument("--orthanc-loaded", action="store_true", help="Orthanc already holds this seed's studies: skip loading")
    p.add_argument("--rounds", type=int, default=3, help="alternating findscu rounds (default 3)")
    p.add_argument("--pg-1m", action="store_true", help="a cached PostgreSQL index of --studies x --instances rows")
    p.add_argument("--studies", type=int, default=20000, help="--pg-1m: studies (default 20000)")
    p.add_argument("--instances", type=int, default=50, help="--pg-1m: instances per study (default 50)")
    p.add_argument("--pg-cache", type=Path, default=Path("/tmp/xdsi-bench-find-pg1m"), help="--pg-1m: server folder kept between runs")
    add_index_options(p)
    args = p.parse_args(argv)

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from xdsi.dimse.server import set_nodelay

    rng = random.Random(args.seed)
    with bench(args, "find") as b:
        t0 = time.perf_counter()
        headers: list = []  # type: ignore[type-arg]
        if args.pg_1m:
            pg = CachedPostgres(args.pg_cache).start()
            b.stack.callback(pg.stop)
            name = f"find_{args.studies}x{args.instances}_{args.seed}"
            b.index_url, b.backend = pg.database(name), "postgresql"
            marker = args.pg_cache / f"{name}.built"
            if not marker.exists():
                build_scale_index(pg, b.index_url, args.studies, args.instances, args.seed)
                marker.write_text("built\n")
                print(f"built {args.studies} studies x {args.instances} instances with COPY in {time.perf_counter() - t0:.1f} s")
            else:
                from xdsi.index.db import open_index

                open_index(b.index_url).dispose()  # migrations since the build, if any
                print(f"reusing {args.studies} x {args.instances} rows in {args.pg_cache}")
            patients = scale_patients(args.studies, args.seed)
            args.n = args.studies
        else:
            patients = populate(b.index_url, args.n, rng, headers)
            print(f"indexed {args.n} studies of {len(patients)} patients in {time.perf_counter() - t0:.1f} s")
        server = b.serve()
        if args.pg_1m:
            qdir = b.dir / "queries"
            qdir.mkdir()
            qs = {
                "id": (_query_file(qdir, "id", PatientID=patients[len(patients) // 2][0]), 201),
                "name": (_query_file(qdir, "name", PatientName="SMI*"), 6),
                "all": (_query_file(qdir, "all"), 3),
            }
            lines = xdsi_marginal(server.dicom_port, server.ae_title, qs, args.rounds)
            print(f"find at scale: findscu, study root, {args.studies} studies x {args.instances} instances "
                  f"({args.studies * args.instances} instance rows), postgresql index, marginal ms per query inside one "
                  f"association, median of {args.rounds} rounds [{machine()}]")
            print("\n".join(lines))
        if args.orthanc_port:
            t0 = time.perf_counter()
            if not args.orthanc_loaded:
                load_peer(args.orthanc_port, args.orthanc_aet, headers)
            print(f"stored the same {args.n} studies into Orthanc in {time.perf_counter() - t0:.1f} s")
            qdir = b.dir / "queries"
            qdir.mkdir()
            pid = patients[len(patients) // 2][0]
            qs = {
                "id": (_query_file(qdir, "id", PatientID=pid), 201),
                "name": (_query_file(qdir, "name", PatientName="SMI*"), 41),
                "all": (_query_file(qdir, "all"), 8),
            }
            lines = compare((server.dicom_port, server.ae_title), (args.orthanc_port, args.orthanc_aet), qs, args.rounds)
            print(f"find vs Orthanc: findscu, study root, {args.n} studies, {b.backend} index, marginal ms per query "
                  f"inside one association, median of {args.rounds} alternating rounds [{machine()}]")
            print("\n".join(lines))
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
