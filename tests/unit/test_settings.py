"""Settings: defaults, config file, environment overrides, and one clear error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from riskbridge.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("RISKBRIDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no ./riskbridge.toml


def test_defaults_point_at_the_loopback_sandbox() -> None:
    settings = load_settings()
    assert settings.pacs.host == "127.0.0.1"
    assert settings.pacs.port == 14242
    assert settings.fhir.base_url == "http://127.0.0.1:18080/fhir"
    assert "15432" in settings.database.dsn.get_secret_value()
    assert settings.sandbox.dir == Path(".riskbridge/sandbox")


def test_config_file_then_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "site.toml"
    config.write_text('[pacs]\nhost = "pacs.example"\nport = 104\ncalled_ae = "MAINPACS"\n')
    monkeypatch.setenv("RISKBRIDGE_PACS__PORT", "11112")
    settings = load_settings(config)
    assert settings.pacs.host == "pacs.example"
    assert settings.pacs.called_ae == "MAINPACS"
    assert settings.pacs.port == 11112


def test_config_file_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "site.toml"
    config.write_text('staging_dir = "/data/staging"\n[fhir]\nbase_url = "https://ehr.example/fhir/"\n')
    monkeypatch.setenv("RISKBRIDGE_CONFIG", str(config))
    settings = load_settings()
    assert settings.fhir.base_url == "https://ehr.example/fhir"
    assert settings.staging_dir == Path("/data/staging")


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("RISKBRIDGE_PACS__PORT", "abc", "pacs.port"),
        ("RISKBRIDGE_PACS__PORT", "70000", "pacs.port"),
        ("RISKBRIDGE_PACS__CALLING_AE", "A_TITLE_THAT_IS_TOO_LONG", "pacs.calling_ae"),
        ("RISKBRIDGE_FHIR__BASE_URL", "ftp://ehr", "fhir.base_url"),
        ("RISKBRIDGE_FHIR__AUTH__TYPE", "basic", "fhir.auth"),
        ("RISKBRIDGE_FHIR__AUTH__TYPE", "kerberos", "fhir.auth.type"),
    ],
)
def test_bad_setting_names_the_key(monkeypatch: pytest.MonkeyPatch, env: str, value: str, expected: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert f"{expected}:" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_key_in_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text("[pacs]\nhots = 'typo'\n")
    with pytest.raises(SettingsError, match=r"pacs\.hots: unknown setting"):
        load_settings(config)


def test_missing_and_malformed_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[pacs\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(broken)


def test_secrets_are_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RISKBRIDGE_FHIR__AUTH__TYPE", "bearer")
    monkeypatch.setenv("RISKBRIDGE_FHIR__AUTH__TOKEN", "s3cr3t-token")
    settings = load_settings()
    assert "s3cr3t-token" not in repr(settings)
    assert settings.fhir.auth.token is not None
    assert settings.fhir.auth.token.get_secret_value() == "s3cr3t-token"


def test_tls_files_must_exist(tmp_path: Path) -> None:
    config = tmp_path / "tls.toml"
    config.write_text(
        "[pacs.tls]\nca_file = '/nonexistent/ca.pem'\n"
        "cert_file = '/nonexistent/c.pem'\nkey_file = '/nonexistent/k.pem'\n"
    )
    with pytest.raises(SettingsError, match=r"pacs\.tls\.ca_file: Value error, file not found"):
        load_settings(config)


def test_site_identity_and_writeback_sections_build_their_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    from riskbridge.harmonize.identity import IdentityConfig
    from riskbridge.stages.write_back import WritebackConfig

    monkeypatch.setenv("RISKBRIDGE_SITE__TIMEZONE", "America/New_York")
    monkeypatch.setenv("RISKBRIDGE_IDENTITY__ISSUER_SYSTEMS", '{"SYNTH_HOSP": "http://hospital.example/mrn"}')
    monkeypatch.setenv("RISKBRIDGE_IDENTITY__DEFAULT_ISSUER", "SYNTH_HOSP")
    monkeypatch.setenv("RISKBRIDGE_WRITEBACK__HIGH_FROM", "0.4")
    settings = load_settings()
    assert settings.site.timezone == "America/New_York"
    identity = IdentityConfig.from_settings(settings.identity)
    assert identity.system_for("synth_hosp") == "http://hospital.example/mrn" and not identity.fallback.enabled
    assert WritebackConfig.from_settings(settings.writeback).thresholds == (0.1, 0.4)


@pytest.mark.parametrize(
    ("env", "value", "key"),
    [
        ("RISKBRIDGE_SITE__TIMEZONE", "Mars/Olympus", "site.timezone"),
        ("RISKBRIDGE_IDENTITY__DEFAULT_ISSUER", "NOWHERE", "identity"),
        ("RISKBRIDGE_WRITEBACK__LOW_BELOW", "0.5", "writeback"),
    ],
)
def test_bad_site_identity_and_writeback_settings_name_the_key(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, key: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=key):
        load_settings()


def test_the_clinical_stage_needs_a_site_timezone() -> None:
    from riskbridge.errors import ConfigurationError
    from riskbridge.stages.clinical import ClinicalHarmonizer

    with pytest.raises(ConfigurationError, match=r"site\.timezone"):
        ClinicalHarmonizer.from_settings(None, Settings())  # type: ignore[arg-type]
    harmonizer = ClinicalHarmonizer.from_settings(None, Settings(site={"timezone": "Europe/Zurich"}))  # type: ignore[arg-type]
    assert harmonizer.spec.label == "chest_ct@1" and harmonizer.zone == "Europe/Zurich"
