"""DICOM context groups for XDS-I.b event codes: CID 29 acquisition modalities and CID 4 anatomic regions.

RAD TF-3 4.68.4.1.2.3.2 (Gazelle RAD68-019) wants one eventCodeList entry per
distinct *acquisition modality* of the study, from CID 29, plus anatomic region
codes from CID 4.  The code values come from pydicom's tables generated from
PS3.16 (``pydicom.sr._cid_dict``), never from the affinity domain's list: the
domain list is only the filter a registry enforces, and it can be stale (the
NIST Connectathon list still has SNOMED CT 43799004 as "Chest", which current
CID 4 means "Intra-thoracic"; Chest is 816094009).

Body Part Examined (0018,0015) is a free-ish CS: PS3.16 Annex L Table L-1 gives
the Defined Terms and the CID 4 code each corresponds to.  ``BODY_PART_REGIONS``
is that table for the terms imaging departments send; each code is checked
against CID 4 by the tests, so a code that a later PS3.16 retires shows up there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.sr import _snomed_dict
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr.codedict import codes

from xdsi.standards.constants import MODALITY_CODING_SCHEME, SNOMED_CODING_SCHEME

CID_ANATOMIC_REGION = 4
CID_ACQUISITION_MODALITY = 29


@dataclass(frozen=True)
class Concept:
    """A code of a DICOM context group, with the OID XDS metadata uses as its codingScheme."""

    value: str
    scheme: str  # codingScheme OID
    meaning: str


def _cid(cid: int) -> dict[str, Concept]:
    """code value -> concept for one CID, from pydicom's PS3.16 tables."""
    group = getattr(codes, f"cid{cid}")
    out: dict[str, Concept] = {}
    for designator, keywords in cid_concepts[cid].items():
        scheme = {"SCT": SNOMED_CODING_SCHEME, "DCM": MODALITY_CODING_SCHEME}[designator]
        for kw in keywords:
            c = getattr(group, kw)
            out.setdefault(c.value, Concept(c.value, scheme, c.meaning))
    return out


CID4: dict[str, Concept] = _cid(CID_ANATOMIC_REGION)
CID29: dict[str, Concept] = _cid(CID_ACQUISITION_MODALITY)

# PS3.16 Annex L Table L-1: Body Part Examined Defined Term -> (SNOMED CT code of CID 4, Code Meaning of Table L-1).
# Codes are the current SNOMED CT concept ids (CP-1962 / 2019+ "Structure of" concepts): Pelvis is 816092008
# (12921003 before), Chest 816094009 (51185008 before; 43799004 is now "Intra-thoracic").
BODY_PART_REGIONS: dict[str, tuple[str, str]] = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ADRENAL": ("23451007", "Adrenal gland"),
    "ANKLE": ("70258002", "Ankle joint"),
    "AORTA": ("15825003", "Aorta"),
    "AXILLA": ("91470000", "Axilla"),
    "BACK": ("77568009", "Back"),
    "BLADDER": ("89837001", "Bladder"),
    "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"),
    "BRONCHUS": ("955009", "Bronchus"),
    "BUTTOCK": ("46862004", "Buttock"),
    "CALCANEUS": ("80144004", "Calcaneus"),
    "CAROTID": ("69105007", "Carotid Artery"),
    "CEREBELLUM": ("113305005", "Cerebellum"),
    "CERVIX": ("71252005", "Cervix"),
    "CHEEK": ("60819002", "Cheek"),
    "CHEST": ("816094009", "Chest"),
    "THORAX": ("816094009", "Chest"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "CIRCLEOFWILLIS": ("11279006", "Circle of Willis"),
    "CLAVICLE": ("51299004", "Clavicle"),
    "COCCYX": ("64688005", "Coccyx"),
    "COLON": ("71854001", "Colon"),
    "CORNEA": ("28726007", "Cornea"),
    "CORONARYARTERY": ("41801008", "Coronary artery"),
    "CSPINE": ("122494005", "Cervical spine"),
    "CTSPINE": ("1217257000", "Cervico-thoracic spine"),
    "DUODENUM": ("38848004", "Duodenum"),
    "EAR": ("117590005", "Ear"),
    "ELBOW": ("16953009", "Elbow joint"),
    "ESOPHAGUS": ("32849002", "Esophagus"),
    "EXTREMITY": ("66019005", "Extremity"),
    "EYE": ("81745001", "Eye"),
    "EYELID": ("80243003", "Eyelid"),
    "FACE": ("89545001", "Face"),
    "FEMUR": ("71341001", "Femur"),
    "FINGER": ("7569003", "Finger"),
    "FOOT": ("56459004", "Foot"),
    "GALLBLADDER": ("28231008", "Gallbladder"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("24136001", "Hip joint"),
    "HUMERUS": ("85050009", "Humerus"),
    "IAC": ("361078006", "Internal Auditory Canal"),
    "ILEUM": ("34516001", "Ileum"),
    "ILIUM": ("22356005", "Ilium"),
    "JAW": ("661005", "Jaw region"),
    "JEJUNUM": ("21306003", "Jejunum"),
    "KIDNEY": ("64033007", "Kidney"),
    "KNEE": ("72696002", "Knee"),
    "LARYNX": ("4596009", "Larynx"),
    "LEG": ("30021000", "Lower leg"),
    "LIVER": ("10200004", "Liver"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "LSSPINE": ("1217253001", "Lumbo-sacral spine"),
    "LUNG": ("39607008", "Lung"),
    "MAXILLA": ("70925003", "Maxilla"),
    "MEDIASTINUM": ("72410000", "Mediastinum"),
    "MOUTH": ("123851003", "Mouth"),
    "NECK": ("45048000", "Neck"),
    "NECKCHEST": ("417437006", "Neck and Chest"),
    "NECKCHESTABDOMEN": ("416152001", "Neck, Chest and Abdomen"),
    "NECKCHESTABDPELV": ("416319003", "Neck, Chest, Abdomen and Pelvis"),
    "NOSE": ("45206002", "Nose"),
    "ORBIT": ("363654007", "Orbital structure"),
    "OVARY": ("15497006", "Ovary"),
    "PANCREAS": ("15776009", "Pancreas"),
    "PAROTID": ("45289007", "Parotid gland"),
    "PATELLA": ("64234005", "Patella"),
    "PELVIS": ("816092008", "Pelvis"),
    "PENIS": ("18911002", "Penis"),
    "PHARYNX": ("54066008", "Pharynx"),
    "PROSTATE": ("41216001", "Prostate"),
    "RECTUM": ("34402009", "Rectum"),
    "RIB": ("113197003", "Rib"),
    "SACRUM": ("54735007", "Sacrum"),
    "SCALP": ("41695006", "Scalp"),
    "SCAPULA": ("79601000", "Scapula"),
    "SCLERA": ("18619003", "Sclera"),
    "SCROTUM": ("20233005", "Scrotum"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SKULL": ("89546000", "Skull"),
    "SPINE": ("421060004", "Spine"),
    "SPLEEN": ("78961009", "Spleen"),
    "STERNUM": ("56873002", "Sternum"),
    "STOMACH": ("69695003", "Stomach"),
    "SUBMANDIBULAR": ("54019009", "Submandibular gland"),
    "TESTIS": ("40689003", "Testis"),
    "THIGH": ("68367000", "Thigh"),
    "THUMB": ("76505004", "Thumb"),
    "THYMUS": ("9875009", "Thymus"),
    "THYROID": ("69748006", "Thyroid"),
    "TJOINT": ("53620006", "Temporomandibular joint"),
    "TLSPINE": ("1217256009", "Thoraco-lumbar spine"),
    "TOE": ("29707007", "Toe"),
    "TONGUE": ("21974007", "Tongue"),
    "TRACHEA": ("44567001", "Trachea"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "ARM": ("40983000", "Upper arm"),
    "URETER": ("87953007", "Ureter"),
    "URETHRA": ("13648007", "Urethra"),
    "UTERUS": ("35039007", "Uterus"),
    "VAGINA": ("76784001", "Vagina"),
    "VULVA": ("45292006", "Vulva"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist joint"),
    "ZYGOMA": ("13881006", "Zygoma"),
}

# Modalities that are not acquisition modalities: never an event code (RAD68-019), whatever the domain lists
NOT_ACQUISITION = frozenset({"OT", "SR", "KO", "PR", "DOC", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "FID", "AU", "PLAN"})


def body_part_term(value: str) -> str:
    """A Body Part Examined value as an Annex L Defined Term: upper case, no spaces or underscores."""
    return re.sub(r"[\s_]+", "", value or "").upper()


def region_for_body_part(body_part: str) -> Concept | None:
    """The CID 4 region of a Body Part Examined Defined Term (Annex L), or None for a term it does not define."""
    found = BODY_PART_REGIONS.get(body_part_term(body_part))
    if found is None:
        return None
    value, meaning = found
    return Concept(value, SNOMED_CODING_SCHEME, meaning)


def region_for_code(value: str, designator: str, meaning: str) -> Concept | None:
    """The CID 4 concept of an Anatomic Region Sequence item, or None when it is not one.

    An SCT code of CID 4 is taken as it is.  A retired SNOMED-RT id (SRT, e.g.
    T-D6000) or a superseded SCT id (12921003 "Pelvis") is mapped to the current
    code through its Code Meaning read as an Annex L term, then through pydicom's
    SNOMED RT -> CT table when that lands in CID 4; anything else is not guessed.
    """
    value, designator = (value or "").strip(), (designator or "").strip().upper()
    if designator in ("SCT", SNOMED_CODING_SCHEME) and value in CID4:
        return Concept(value, SNOMED_CODING_SCHEME, BODY_PART_REGIONS_MEANING.get(value, CID4[value].meaning))
    if designator not in ("SCT", "SRT", "SNM3", "99SDM", SNOMED_CODING_SCHEME):
        return None
    by_meaning = region_for_body_part(meaning)
    if by_meaning is not None:
        return by_meaning
    if designator == "SRT":
        sct = _snomed_dict.mapping.get("SRT", {}).get(value)
        if sct in CID4:
            return Concept(sct, SNOMED_CODING_SCHEME, BODY_PART_REGIONS_MEANING.get(sct, CID4[sct].meaning))
    return None


# Table L-1 meaning of each code (the display we send when the domain list has none)
BODY_PART_REGIONS_MEANING: dict[str, str] = {v: m for v, m in BODY_PART_REGIONS.values()}


def acquisition_modality(modality: str) -> Concept | None:
    """The CID 29 concept of a Modality (0008,0060) value, or None when it is not an acquisition modality."""
    m = (modality or "").strip().upper()
    if not m or m in NOT_ACQUISITION:
        return None
    return CID29.get(m)
