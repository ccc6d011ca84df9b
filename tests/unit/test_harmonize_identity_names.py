"""Name comparison for identity matching (riskbridge.harmonize.identity_names): normalization, DICOM PN parts and
the similarity rules (swapped, written together, dropped second surname, typos, shared first words)."""

from __future__ import annotations

from typing import Any

from riskbridge.harmonize.identity_names import name_similarity, normalize_name, pacs_name_parts


def test_normalize_name_and_pn_parts() -> None:
    assert normalize_name("  Müller-Lüdenscheidt, Jr. ") == "muller ludenscheidt jr"
    assert pacs_name_parts("SYNTH-ECHO^THREE") == ("synth echo", "three")
    assert pacs_name_parts("DOE^JOHN^PAUL^DR^III=ideographic") == ("doe", "john paul")
    assert pacs_name_parts("DOE") == ("doe", "")


def test_name_similarity_rules() -> None:
    def named(family: str, given: str) -> dict[str, Any]:
        return {"name": [{"family": family, "given": [given]}]}

    assert name_similarity("SYNTH-ECHO^THREE", named("Synth-Echo", "Three")) == 1.0
    assert name_similarity("SMITH^JOHN", named("John", "Smith")) == 1.0  # swapped
    assert name_similarity("DE LA CRUZ^MARIA", named("Delacruz", "Maria")) == 1.0  # written together
    assert name_similarity("GARCIA LOPEZ^ANA", named("Garcia", "Ana")) == 1.0  # second surname dropped
    assert name_similarity("SMITH^JOHN", {"name": [{"text": "John Smith"}]}) == 1.0
    assert 0.85 < (name_similarity("SMITH^JOHN", named("Smyth", "John")) or 0) < 1.0  # a typo stays close
    # A shared first word must not carry different names over the threshold (Jaro-Winkler's prefix bonus).
    assert (name_similarity("SYNTH-ECHO^THREE", named("Synth-Delta", "Three")) or 1) < 0.7
    assert (name_similarity("SYNTH-ECHO^THREE", named("Synth-Echo", "Two")) or 1) < 0.7
    # The best of several names counts (a maiden name kept as an old name).
    two_names = {"name": [{"family": "Other", "given": ["Ann"]}, {"use": "old", "family": "Echo", "given": ["Ann"]}]}
    assert name_similarity("ECHO^ANN", two_names) == 1.0
    assert name_similarity("", named("Echo", "Ann")) is None
    assert name_similarity("ECHO^ANN", {"name": []}) is None
