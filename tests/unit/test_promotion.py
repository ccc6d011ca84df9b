"""Pinning a promoted model in the site's TOML config file (riskbridge.promotion.pin_in_config), without a ledger."""

from __future__ import annotations

import tomllib
from pathlib import Path

from riskbridge.promotion import pin_in_config

SHA = "ab" * 32


def test_the_pins_replace_the_run_sections_model_and_shadow_lines_and_keep_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "riskbridge.toml"
    config.write_text(
        "# the site's settings\n"
        '[site]\ntimezone = "Europe/Berlin"\n\n'
        "[run]   # scoring\n"
        'model_package = "/old/package"\n'
        'shadow_package = "/new/package"\n'
        'shadow_sha256 = "' + SHA + '"\n'
        "retrieve_chunk_size = 4\n\n"
        "[airflow]\nretries = 1\n",
        encoding="utf-8",
    )
    package = tmp_path / "new-package"
    pin_in_config(config, package, SHA)
    text = config.read_text(encoding="utf-8")
    values = tomllib.loads(text)
    assert values["run"] == {
        "model_package": package.resolve().as_posix(),
        "model_sha256": SHA,
        "retrieve_chunk_size": 4,
    }
    assert values["site"] == {"timezone": "Europe/Berlin"} and values["airflow"] == {"retries": 1}
    assert text.startswith("# the site's settings\n") and "[run]   # scoring" in text


def test_a_config_without_a_run_section_gets_one(tmp_path: Path) -> None:
    config = tmp_path / "riskbridge.toml"
    config.write_text('[site]\ntimezone = "UTC"\n', encoding="utf-8")
    pin_in_config(config, tmp_path / "pkg", SHA)
    assert tomllib.loads(config.read_text())["run"]["model_sha256"] == SHA
    assert not list(tmp_path.glob(".riskbridge.toml.*")), "no temporary file is left behind"
