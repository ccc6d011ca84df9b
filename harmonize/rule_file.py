"""What the YAML rule files of harmonize have in common: the one error a malformed or unreadable one raises.

Series selection (``rules/<name>.yaml``, :mod:`riskbridge.harmonize.series_rule_file`) and comorbidity notes
(``data/comorbidity_rules.yaml``, :mod:`riskbridge.harmonize.notes_rule_file`) both raise :class:`RuleFileError`,
importable from :mod:`riskbridge.harmonize.series` and :mod:`riskbridge.harmonize.notes` too.
"""

from __future__ import annotations

from pathlib import Path

from riskbridge.errors import ConfigurationError

__all__ = ["RuleFileError", "read_rule_text"]


class RuleFileError(ConfigurationError, ValueError):
    """A rule file cannot be read or is malformed; the message names the file and the offending rule or entry.

    Raised for series-selection rule files (format in docs/series-selection.md) and comorbidity rule files
    (format in docs/notes.md). Still a ``ValueError``, as it always was.
    """


def read_rule_text(path: Path, what: str) -> str:
    """The text of a YAML file of harmonize (``what``: "rule file", "label spec", ...); :class:`RuleFileError` naming
    the file when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleFileError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError(f"{path}: cannot read the {what}: {exc}") from None
