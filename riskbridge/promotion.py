"""Model promotion: a candidate package becomes the active model only after its checks pass.

``riskbridge model promote PACKAGE`` checks, in order: the package verifies (every file's sha256); it was trained on
the feature spec the pipeline builds; and it has a shadow record in the ledger (scored in shadow next to the active
model in at least ``min_runs`` finished runs and ``min_studies`` studies, with at most ``max_failed_share`` of them
failing). When all pass, the promotion is recorded in the ledger (``model_promotions``) and the active model's pins
(``[run] model_package`` and ``model_sha256``) are written into the site's TOML config file, with the shadow
settings removed; the next run scores with the candidate, and a run verifies the pinned sha256 before it scores.
Without a config file the command prints the settings to set (for an environment or a secrets store).
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from riskbridge.errors import ConfigurationError
from riskbridge.ledger import Ledger
from riskbridge.settings import Settings, load_settings

__all__ = ["Check", "Promotion", "PromotionError", "check_candidate", "pin_in_config", "record_promotion"]


class PromotionError(ConfigurationError):
    """A candidate cannot be promoted; the message names every check that failed."""


@dataclass(frozen=True)
class Check:
    """One promotion check: its name, whether it passed, and what it found."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Promotion:
    """A candidate package and the outcome of its checks."""

    package: Path
    name: str
    version: str
    sha256: str
    feature_spec: str
    checks: Sequence[Check] = field(default_factory=tuple)
    shadow_runs: int = 0
    shadow_studies: int = 0
    shadow_failed: int = 0

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return bool(self.checks) and all(check.passed for check in self.checks)


def check_candidate(
    settings: Settings,
    ledger: Ledger,
    package: Path,
    min_runs: int = 3,
    min_studies: int = 50,
    max_failed_share: float = 0.01,
) -> Promotion:
    """Run the promotion checks of ``package`` against the settings' feature spec and the ledger's shadow record."""
    from riskbridge.harmonize.features import resolve_feature_spec
    from riskbridge.model.package import ModelPackageError, read_package_info

    try:
        info = read_package_info(package)
    except ModelPackageError as exc:
        return Promotion(package, "?", "?", "", "?", (Check("package", False, str(exc)),))
    checks = [Check("package", True, f"{info.name} {info.version}, every file verified, sha256 {info.sha256[:12]}")]
    wanted = resolve_feature_spec(settings.feature_spec).label
    checks.append(
        Check(
            "feature spec", info.feature_spec == wanted, f"trained on {info.feature_spec}; the pipeline builds {wanted}"
        )
    )
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT count(DISTINCT h.run_id) AS runs, count(*) FILTER (WHERE h.error IS NULL) AS studies,
                      count(*) FILTER (WHERE h.error IS NOT NULL) AS failed
               FROM shadow_scores h JOIN runs r USING (run_id)
               WHERE h.model_sha256 = %s AND r.status = 'success'""",
            (info.sha256,),
        )
        row = cursor.fetchone()
    runs, studies, failed = int(row["runs"]), int(row["studies"]), int(row["failed"])
    checks.append(
        Check("shadow runs", runs >= min_runs, f"{runs} finished run(s) scored it in shadow (need {min_runs})")
    )
    checks.append(Check("shadow studies", studies >= min_studies, f"{studies} studies scored (need {min_studies})"))
    share = failed / (studies + failed) if studies + failed else 0.0
    checks.append(
        Check(
            "shadow failures",
            share <= max_failed_share,
            f"{failed} failed ({share:.1%}; at most {max_failed_share:.1%})",
        )
    )
    return Promotion(package, info.name, info.version, info.sha256, info.feature_spec, tuple(checks), runs, studies,
                     failed)  # fmt: skip


def record_promotion(ledger: Ledger, promotion: Promotion) -> int:
    """Record a promotion that passed its checks; return its id."""
    if not promotion.passed:
        raise PromotionError("only a candidate that passed every check is promoted")
    with ledger.transaction() as cursor:
        cursor.execute(
            """INSERT INTO model_promotions (model_name, model_version, model_sha256, package_path, feature_spec,
                   shadow_runs, shadow_studies, shadow_failed) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
               RETURNING promotion_id""",
            (promotion.name, promotion.version, promotion.sha256, str(promotion.package.resolve()),
             promotion.feature_spec, promotion.shadow_runs, promotion.shadow_studies, promotion.shadow_failed),
        )  # fmt: skip
        return int(cursor.fetchone()["promotion_id"])


_TABLE = re.compile(r"^\s*\[([^\]]+)\]\s*(#.*)?$")
_PINS = ("model_package", "model_sha256", "shadow_package", "shadow_sha256")


def pin_in_config(config_file: Path, package: Path, sha256: str) -> None:
    """Set ``[run] model_package`` and ``model_sha256`` in a TOML config file and drop the shadow settings (the
    candidate is the active model now); the other lines stay as they are. The file is replaced atomically after
    the result was read back as valid settings with exactly these pins."""
    lines = config_file.read_text(encoding="utf-8").splitlines()
    out: list[str] = []
    section: str | None = None
    wrote = False
    pins = [f'model_package = "{package.resolve().as_posix()}"', f'model_sha256 = "{sha256}"']
    for line in lines:
        table = _TABLE.match(line)
        if table is not None:
            if section == "run" and not wrote:
                out += pins
                wrote = True
            section = table.group(1).strip()
            out.append(line)
            continue
        key = line.split("=", 1)[0].strip() if "=" in line else None
        if section == "run" and key in _PINS:
            continue
        out.append(line)
    if section == "run" and not wrote:
        out += pins
        wrote = True
    if not wrote:
        out += ["", "[run]", *pins]
    text = "\n".join(out) + "\n"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PromotionError(f"{config_file}: could not write the pins as valid TOML ({exc})") from None
    handle, temporary = tempfile.mkstemp(dir=config_file.parent, prefix=f".{config_file.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    try:
        written = load_settings(Path(temporary))
        if written.run.model_sha256 != sha256 or written.run.shadow_package is not None:
            raise PromotionError(f"{config_file}: the pins did not take (an environment variable overrides them?)")
        os.replace(temporary, config_file)
    finally:
        Path(temporary).unlink(missing_ok=True)  # gone after the replace; left over when a check failed
