"""Person names compared for identity matching: a DICOM PN against the names of a FHIR Patient, 0..1.

Names are normalized (:func:`normalize_name`: accents and punctuation removed, lower case), a PN is split into
family and given names (:func:`pacs_name_parts`), and :func:`name_similarity` scores them word by word with
rapidfuzz Jaro-Winkler against every HumanName of the Patient (family and given swapped tried too). Used by
:mod:`riskbridge.harmonize.identity` for the demographic check and the fallback; thresholds live in its
configuration (:mod:`riskbridge.harmonize.identity_config`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from rapidfuzz import fuzz
from rapidfuzz.distance import JaroWinkler

__all__ = ["PatientResource", "name_similarity", "normalize_name", "pacs_name_parts"]

PatientResource = Mapping[str, Any]  # a FHIR Patient as a plain (JSON) dict


def normalize_name(text: str) -> str:
    """Lower-case ASCII letters and digits separated by single spaces (accents and punctuation removed)."""
    decomposed = unicodedata.normalize("NFKD", text)
    letters = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()
    return " ".join(re.sub(r"[^0-9a-z]+", " ", letters).split())


def pacs_name_parts(person_name: str) -> tuple[str, str]:
    """(family, given) of a DICOM PN, normalized; given includes middle names. Only the alphabetic group counts."""
    alphabetic = person_name.split("=", 1)[0]
    components = [*alphabetic.split("^"), "", ""]
    family, given, middle = components[0], components[1], components[2]
    return normalize_name(family), normalize_name(f"{given} {middle}")


def _fhir_names(patient: PatientResource) -> list[tuple[str, str, str]]:
    """(family, given, text) per HumanName of a Patient, normalized; every name counts (an old name may match)."""
    names = []
    for name in patient.get("name") or []:
        if not isinstance(name, Mapping):
            continue
        family = normalize_name(str(name.get("family") or ""))
        given = normalize_name(" ".join(str(part) for part in name.get("given") or []))
        names.append((family, given, normalize_name(str(name.get("text") or ""))))
    return names


def _jaro_winkler(left: str, right: str) -> float:
    return float(JaroWinkler.normalized_similarity(left, right))


def _part_similarity(left: str, right: str) -> float:
    """Similarity of two normalized name parts (family or given), token by token.

    Jaro-Winkler on whole multi-word names is lenient: its common-prefix bonus rates "synth echo" vs
    "synth delta" 0.87. So each word of the shorter name is matched to its best word in the other name and the
    weakest word counts. When the word counts differ (a dropped second surname or middle name, "de la cruz" vs
    "delacruz") the names written without spaces are compared too and the better score counts.
    """
    left_words, right_words = left.split(), right.split()
    shorter, longer = sorted((left_words, right_words), key=len)
    by_word = min(max(_jaro_winkler(word, other) for other in longer) for word in shorter)
    if len(left_words) == len(right_words):
        return by_word
    return max(by_word, _jaro_winkler("".join(left_words), "".join(right_words)))


def name_similarity(person_name: str, patient: PatientResource) -> float | None:
    """How similar a DICOM PN is to the best of a Patient's names, 0..1; None when either side has no name.

    Family and given names are compared separately (Jaro-Winkler word by word, see :func:`_part_similarity`) and
    the lower score counts, so both must be close; family and given swapped is tried too (a common registration
    error). A FHIR name with only ``text`` is compared as a whole, order-insensitively (rapidfuzz
    token_sort_ratio). A side without a given name is compared on the family name only.
    """
    family, given = pacs_name_parts(person_name)
    if not family and not given:
        return None
    best: float | None = None
    for fhir_family, fhir_given, text in _fhir_names(patient):
        if fhir_family or fhir_given:
            scores = []
            for this_family, this_given in ((family, given), (given, family)):
                if not this_family or not fhir_family:
                    continue
                family_score = _part_similarity(this_family, fhir_family)
                if this_given and fhir_given:
                    scores.append(min(family_score, _part_similarity(this_given, fhir_given)))
                else:
                    scores.append(family_score)
            score = max(scores) if scores else None
        elif text:
            score = fuzz.token_sort_ratio(f"{family} {given}", text) / 100.0
        else:
            score = None
        if score is not None and (best is None or score > best):
            best = score
    return best
