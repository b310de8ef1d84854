"""befund's own table of coded concepts for result objects.

We keep our own table instead of looking codes up by keyword in pydicom's code dictionary:
that dictionary carries some meanings that differ from what DICOM PS3.16 and IHE AIR use
(for example `codes.SCT.IntracranialHemorrhage` has the meaning
"Intracranial hemorrhage (disorder)", and the same SCT value appears under more than one
keyword). Every constant names its source. "PS3.16" is DICOM Part 16 (Content Mapping
Resource); "AIR" is the IHE Radiology AI Results profile.

Each constant is a `pydicom.sr.coding.Code`; highdicom accepts them wherever it takes a
`CodedConcept`, and `concept()` gives the highdicom type when one is needed.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

from pipelines import model_card

# --- Findings and their evaluation ------------------------------------------------------------

# PS3.16 TID 1501 row 3b "Finding" (concept name of the finding type), also the concept name of
# our qualitative evaluation "Finding = Present | Absent | Indeterminate" (DESIGN.md "Codes").
FINDING = Code("121071", "DCM", "Finding")
# SNOMED CT 1386000 "Intracranial hemorrhage (disorder)"; display meaning as in DESIGN.md.
INTRACRANIAL_HEMORRHAGE = Code("1386000", "SCT", "Intracranial hemorrhage")
# SNOMED CT 12738006 "Brain structure"; PS3.16 CID 4 uses the meaning "Brain".
BRAIN = Code("12738006", "SCT", "Brain")
# SNOMED CT qualifier values 52101004 "Present" and 272519000 "Absent" (DESIGN.md "Codes").
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
# SNOMED CT 82334004 "Indeterminate (qualifier value)": the verdict of a result that was not
# analysed; the reason travels as a TEXT "Comment" next to it (never silence).
INDETERMINATE = Code("82334004", "SCT", "Indeterminate")
# PS3.16 DCM 121106 "Comment": TEXT item carrying "not analysed: <reason>".
COMMENT = Code("121106", "DCM", "Comment")
VERDICTS = (PRESENT, ABSENT, INDETERMINATE)

# PS3.16 DCM 111012 "Certainty of Finding" (CID 6048, defined as "the likelihood that the
# finding detected is in fact the type of finding identified"). PS3.16's CAD templates
# (TID 4006 row 6 and the chest/colon CAD templates) encode it in UCUM "%" with a value
# range 0..100, and PixelMed's validator enforces that range there; we use the same scale.
CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")
PERCENT = Code("%", "UCUM", "Percent")
# DESIGN.md lists (1, UCUM, "no units"); a reader must accept certainty in that unit as 0..1.
NO_UNITS = Code("1", "UCUM", "no units")

# --- Algorithm identification (PS3.16 TID 4019) -----------------------------------------------

ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")

# --- Image references --------------------------------------------------------------------------

# PS3.16 DCM 121112 "Source of Measurement" (TID 1501 row 10b via CID 7551).
SOURCE_OF_MEASUREMENT = Code("121112", "DCM", "Source of Measurement")
# SNOMED CT 260753009 "Source": concept name highdicom gives Image Library entries (TID 1601).
SOURCE = Code("260753009", "SCT", "Source")

# --- TID 1500 document structure ---------------------------------------------------------------

IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
PROCEDURE_REPORTED = Code("121058", "DCM", "Procedure reported")
IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
MEASUREMENT_GROUP = Code("125007", "DCM", "Measurement Group")
IMAGE_LIBRARY = Code("111028", "DCM", "Image Library")
IMAGE_LIBRARY_GROUP = Code("126200", "DCM", "Image Library Group")
# PS3.16 TID 1500 row 12: study-level "Qualitative Evaluations" container (highdicom has no
# API for it; we append it by hand).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
TRACKING_IDENTIFIER = Code("112039", "DCM", "Tracking Identifier")
TRACKING_UID = Code("112040", "DCM", "Tracking Unique Identifier")
FINDING_SITE = Code("363698007", "SCT", "Finding Site")

# Procedure reported (PS3.16 CID 100, extensible). For head CT, 25045-6 passes PixelMed's SR
# validator while (24725-4, LN, "CT Head") does not (DESIGN.md "Codes").
CT_UNSPECIFIED_BODY_REGION = Code("25045-6", "LN", "CT unspecified body region")
# PS3.16 DCM 112703 "Whole Slide Imaging" describes slide microscopy best, but it is not in
# CID 100 and PixelMed's SR validator reports that as an Error; so slides (and any modality
# without a CID 100 code of its own) are reported as SNOMED CT 363679005 "Imaging procedure",
# which CID 100 lists.
WHOLE_SLIDE_IMAGING = Code("112703", "DCM", "Whole Slide Imaging")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
PROCEDURE_BY_MODALITY = {
    "CT": CT_UNSPECIFIED_BODY_REGION,
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
    "SM": IMAGING_PROCEDURE,
}

# --- Contributing equipment (IHE AIR) ----------------------------------------------------------

# AIR: Purpose of Reference of the Contributing Equipment item that names the algorithm.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")

# --- Pathology ---------------------------------------------------------------------------------

# SNOMED CT 108369006 "Neoplasm" (morphologically abnormal structure); pydicom lists the same
# value under both "Tumor" and "Neoplasm". PS3.16 CID 7151/CID 8134 use it for tumor findings.
NEOPLASM = Code("108369006", "SCT", "Neoplasm")
TUMOR = NEOPLASM
# SNOMED CT 42798000 "Area" (PS3.16 CID 7470 "Linear/Area/Volume Measurements").
AREA = Code("42798000", "SCT", "Area")
# SNOMED CT 118565006 "Volume" (PS3.16 CID 7470).
VOLUME = Code("118565006", "SCT", "Volume")
SQUARE_MILLIMETER = Code("mm2", "UCUM", "square millimeter")
MILLILITER = Code("ml", "UCUM", "milliliter")

# AnalysisResult.measurements keys that become TID 300 numeric measurements in the finding's
# group: key -> (concept name, unit). The group's finding type says what the area is of.
# Keys not listed here are not encoded (a number without a coded meaning helps no reader).
MEASUREMENTS: dict[str, tuple[Code, Code]] = {
    "tumor_area_mm2": (AREA, SQUARE_MILLIMETER),
    "area_mm2": (AREA, SQUARE_MILLIMETER),
    "volume_ml": (VOLUME, MILLILITER),
    "hemorrhage_volume_ml": (VOLUME, MILLILITER),
}


def from_card(code: model_card.Code) -> Code:
    """The card's (value, scheme, meaning) as a pydicom Code."""
    return Code(code.value, code.scheme, code.meaning)


def concept(code: Code) -> CodedConcept:
    """The highdicom CodedConcept for a Code (for APIs that insist on it)."""
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def same(a: Code | CodedConcept | None, b: Code | CodedConcept | None) -> bool:
    """Codes are equal when value and scheme match; meanings may differ in wording."""
    if a is None or b is None:
        return False
    return a.value == b.value and a.scheme_designator == b.scheme_designator
