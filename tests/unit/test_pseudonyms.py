"""Log pseudonyms (``riskbridge.records.uid_hash``): a keyed HMAC-SHA256, not the bare SHA-256 anyone can compute
for every MRN; one key per site, the same in every process (spawned retrieval workers and forked loaders included),
made on first use with 32 random bytes and mode 0600; another key gives other tags; keys that cannot serve are
refused with one clear error."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import typer

from riskbridge import console, records
from riskbridge.errors import ConfigurationError
from riskbridge.records import (
    PSEUDONYM_KEY_ENV,
    PSEUDONYM_KEY_FILE_ENV,
    configure_pseudonyms,
    keyed_digest,
    uid_hash,
)
from riskbridge.settings import RunSettings, Settings

UIDS = ["1.2.840.113619.2.55.3.604688119.969.1268071029.320", "MRN-0004711", "ACC-2024-000123", ""]


@pytest.fixture(autouse=True)
def _unkeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts unkeyed, and whatever key and key file it sets up is gone after it."""
    monkeypatch.setattr(records, "_pseudonym_mac", None)
    for name in (PSEUDONYM_KEY_ENV, PSEUDONYM_KEY_FILE_ENV):
        monkeypatch.setenv(name, "")  # remembered, so the test's own exports are undone at teardown
        monkeypatch.delenv(name)


def _settings(key_file: Path) -> Settings:
    return Settings(run=RunSettings(pseudonym_key_file=key_file))


def _tags_in(context: str) -> list[str]:
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(context)) as pool:
        return list(pool.map(uid_hash, UIDS))


def test_a_tag_is_the_keyed_hmac_not_the_bare_sha256(tmp_path: Path) -> None:
    configure_pseudonyms(_settings(tmp_path / "pseudonym.key"))
    key = (tmp_path / "pseudonym.key").read_bytes()
    for uid in UIDS:
        tag = uid_hash(uid)
        assert tag == hmac.new(key, uid.encode(), hashlib.sha256).hexdigest()[:12]
        assert tag != hashlib.sha256(uid.encode()).hexdigest()[:12]
        assert len(tag) == 12 and set(tag) <= set("0123456789abcdef")


def test_the_key_file_is_made_once_with_32_random_bytes_for_its_user_alone(tmp_path: Path) -> None:
    key_file = tmp_path / "state" / "pseudonym.key"
    configure_pseudonyms(_settings(key_file))
    first = key_file.read_bytes()
    assert len(first) == 32 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in key_file.parent.iterdir()] == ["pseudonym.key"]  # no temporary file left behind
    tags = [uid_hash(uid) for uid in UIDS]
    records._pseudonym_mac = None
    configure_pseudonyms(_settings(key_file))
    assert key_file.read_bytes() == first and [uid_hash(uid) for uid in UIDS] == tags


def test_another_key_gives_other_tags(tmp_path: Path) -> None:
    configure_pseudonyms(_settings(tmp_path / "site-a.key"))
    site_a = [uid_hash(uid) for uid in UIDS]
    configure_pseudonyms(_settings(tmp_path / "site-b.key"))
    site_b = [uid_hash(uid) for uid in UIDS]
    assert all(a != b for a, b in zip(site_a, site_b, strict=True))


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_processes_started_after_configuring_tag_alike(tmp_path: Path, context: str) -> None:
    # Retrieval workers are spawned (they see the environment, not the settings); DataLoader workers are forked.
    key_file = tmp_path / "elsewhere" / "site.key"
    configure_pseudonyms(_settings(key_file))
    assert os.environ[PSEUDONYM_KEY_FILE_ENV] == str(key_file)
    assert _tags_in(context) == [uid_hash(uid) for uid in UIDS]


def test_without_configuration_the_default_key_file_is_made_and_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tags = [uid_hash(uid) for uid in UIDS]  # nothing configured: a test, a library caller
    default = tmp_path / RunSettings().pseudonym_key_file
    assert default == tmp_path / ".riskbridge" / "pseudonym.key" and len(default.read_bytes()) == 32
    monkeypatch.chdir(tmp_path.parent)  # a child's working directory does not matter: the path was exported
    assert _tags_in("spawn") == tags
    records._pseudonym_mac = None
    configure_pseudonyms(_settings(default))
    assert [uid_hash(uid) for uid in UIDS] == tags


def test_processes_racing_to_make_the_key_file_all_use_the_one_that_won(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "race.key"
    monkeypatch.setenv(PSEUDONYM_KEY_FILE_ENV, str(key_file))
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        tags = list(pool.map(uid_hash, ["MRN-0004711"] * 9))
    assert len(set(tags)) == 1 and tags[0] == uid_hash("MRN-0004711")
    assert len(key_file.read_bytes()) == 32 and [p.name for p in tmp_path.iterdir()] == ["race.key"]


def test_a_key_in_the_environment_wins_over_the_file_and_reaches_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "k" * 40)
    configure_pseudonyms(_settings(tmp_path / "unused.key"))
    assert uid_hash("MRN-0004711") == hmac.new(b"k" * 40, b"MRN-0004711", hashlib.sha256).hexdigest()[:12]
    assert not (tmp_path / "unused.key").exists()
    assert _tags_in("spawn") == [uid_hash(uid) for uid in UIDS]
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "short")
    with pytest.raises(ConfigurationError, match="at least 16 characters"):
        configure_pseudonyms(_settings(tmp_path / "unused.key"))


def test_a_key_file_that_cannot_serve_is_refused_with_one_clear_error(tmp_path: Path) -> None:
    open_to_all = tmp_path / "open.key"
    open_to_all.write_bytes(os.urandom(32))
    open_to_all.chmod(0o644)
    with pytest.raises(ConfigurationError, match="open to every user: chmod 600"):
        configure_pseudonyms(_settings(open_to_all))
    short = tmp_path / "short.key"
    short.write_bytes(b"12345678")
    short.chmod(0o600)
    with pytest.raises(ConfigurationError, match="holds 8 bytes, fewer than 16"):
        configure_pseudonyms(_settings(short))
    with pytest.raises(ConfigurationError, match=r"pseudonym key file .*directory"):
        configure_pseudonyms(_settings(tmp_path))  # a directory, not a file
    assert records._pseudonym_mac is None  # nothing keyed by a refused key


def test_the_cli_keys_its_pseudonyms_from_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    key_file = tmp_path / "site" / "pseudonym.key"
    monkeypatch.setenv("RISKBRIDGE_RUN__PSEUDONYM_KEY_FILE", str(key_file))
    console.cli_settings()
    assert os.environ[PSEUDONYM_KEY_FILE_ENV] == str(key_file)
    assert uid_hash("x") == hmac.new(key_file.read_bytes(), b"x", hashlib.sha256).hexdigest()[:12]
    key_file.chmod(0o666)
    with pytest.raises(typer.Exit) as ended:  # one line on stderr, exit status 2
        console.cli_settings()
    assert ended.value.exit_code == 2


def test_run_keys_of_accession_lists_are_keyed_too(tmp_path: Path) -> None:
    """An export run by accessions is keyed by a digest of the list: keyed, it cannot be reversed by trying MRNs."""
    from riskbridge.cohort import _scope_key

    accessions = ["ACC0001", "ACC0002"]
    configure_pseudonyms(_settings(tmp_path / "site-a.key"))
    site_a = _scope_key(None, accessions)
    bare = hashlib.sha256("\n".join(accessions).encode()).hexdigest()[:16]
    assert site_a == f"accessions-2-{keyed_digest(chr(10).join(accessions))}" and bare not in site_a
    configure_pseudonyms(_settings(tmp_path / "site-b.key"))
    assert _scope_key(None, list(reversed(accessions))) != site_a
