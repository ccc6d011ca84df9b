"""What the YAML rule files of harmonize have in common: the one error a malformed or unreadable one raises.

Series selection (``rules/<name>.yaml``, :mod:`riskbridge.harmonize.series_rule_file`) and comorbidity notes
(``data/comorbidity_rules.yaml``, :mod:`riskbridge.harmonize.notes_rule_file`) both raise :class:`RuleFileError`,
importable from :mod:`riskbridge.harmonize.series` and :mod:`riskbridge.harmonize.notes` too.
"""

from __future__ import annotations

from riskbridge.errors import ConfigurationError

__all__ = ["RuleFileError"]


class RuleFileError(ConfigurationError, ValueError):
    """A rule file cannot be read or is malformed; the message names the file and the offending rule or entry.

    Raised for series-selection rule files (format in docs/series-selection.md) and comorbidity rule files
    (format in docs/notes.md). Still a ``ValueError``, as it always was.
    """
