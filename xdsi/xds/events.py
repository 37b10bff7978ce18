"""The eventCodeList of a manifest: DICOM codes of the study, intersected with the affinity domain's list.

RAD TF-3 (Gazelle RAD68-019/021) asks for one CID 29 code per distinct
acquisition modality and CID 4 anatomic region codes, with "no codes not found
in the image set" (NIST).  The codes come from the study (:mod:`xdsi.xds.cid`),
the domain's list only decides whether a registry enforcing it would accept
them.  A code the study has but the domain lacks is not sent (the registry would
reject the whole submission) and not silently dropped either: it is a
*finding*, logged when the metadata is built and printed by
``xdsi status --study`` (:func:`publication_findings`), so the operator can ask
the domain to list it or correct the study.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xdsi.xds.cid import NOT_ACQUISITION, Concept, acquisition_modality, body_part_term, region_for_body_part, region_for_code
from xdsi.xds.codes import Code, CodeTable

if TYPE_CHECKING:
    from xdsi.archive import Archive
    from xdsi.xds.manifest import StudySnapshot

log = logging.getLogger(__name__)
EVENT_CODE_LIST = "eventCodeList"


@dataclass
class EventCodes:
    """The codes to send, in RAD68-021 order (modalities, then regions), and what was left out and why."""

    codes: list[Code] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    def _offer(self, concept: Concept, table: CodeTable, why: str) -> None:
        listed = table.find(EVENT_CODE_LIST, concept.value, concept.scheme)
        if listed is None:
            finding = (
                f"eventCode {concept.value} \"{concept.meaning}\" (scheme {concept.scheme}, {why}) is not in the affinity "
                f"domain's eventCodeList ({table.source}): not sent"
            )
            if finding not in self.findings:
                self.findings.append(finding)
        elif listed not in self.codes:
            self.codes.append(listed)  # the domain's own display name: registries compare it

    def _note(self, finding: str) -> None:
        if finding not in self.findings:
            self.findings.append(finding)


def event_codes(snap: "StudySnapshot", table: CodeTable) -> EventCodes:
    """CID 29 acquisition modalities and CID 4 regions of ``snap`` that the domain lists, plus findings for the rest."""
    out = EventCodes()
    for m in snap.modalities:
        concept = acquisition_modality(m)
        if concept is not None:
            out._offer(concept, table, f"CID 29 modality {m}")
        elif m.strip().upper() not in NOT_ACQUISITION:
            out._note(f"Modality {m!r} is not a CID 29 acquisition modality: no event code for it")
    for se in snap.series:
        if not se.instances:
            continue
        for value, designator, meaning in se.anatomic_regions:
            concept = region_for_code(value, designator, meaning)
            if concept is None:
                out._note(f"Anatomic Region ({value}, {designator}, {meaning!r}) of series {se.series_uid} is not a CID 4 region: not sent")
            else:
                out._offer(concept, table, "CID 4 region from Anatomic Region Sequence")
        if se.body_part:
            concept = region_for_body_part(se.body_part)
            if concept is None:
                out._note(f"Body Part Examined {body_part_term(se.body_part)!r} is not a PS3.16 Annex L term: no anatomic region code")
            else:
                out._offer(concept, table, f"CID 4 region of Body Part Examined {body_part_term(se.body_part)}")
    for f in out.findings:
        log.info("study %s: %s", snap.study_uid, f)
    return out


def publication_findings(archive: "Archive", study_uid: str) -> list[str]:
    """Why the study's metadata lacks codes it would otherwise carry, for ``xdsi status --study``."""
    from sqlalchemy import select

    from xdsi.index.xds_models import XdsSubmission
    from xdsi.uids import validate_uid
    from xdsi.xds.manifest import load_study

    study_uid = validate_uid(study_uid, "Study Instance UID")
    with archive.index.session() as s:
        ours = set(s.scalars(select(XdsSubmission.kos_sop_uid).where(XdsSubmission.study_uid == study_uid)).all())
    snap = load_study(archive.index, study_uid, exclude_sops=ours, headers=archive.retrieve)
    if snap is None:
        return []
    return event_codes(snap, CodeTable.load(archive.settings.xds.codes_file)).findings
