"""Kafka credentials from the environment reach every client's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.kafka_config import client_config, faust_credentials, security
from streams.log_rate import LIBRDKAFKA
from streams.output import producer_config


def test_plaintext_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_SECURITY_PROTOCOL", raising=False)
    assert security() == {}
    assert client_config("b:9092", **{"group.id": "g"}) == {
        "bootstrap.servers": "b:9092",
        "logger": LIBRDKAFKA,  # librdkafka's log through Python's, rate-limited
        "group.id": "g",
    }
    assert faust_credentials() is None


def test_sasl_credentials_from_a_secret_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "tracewatch-worker")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", str(secret))
    config = producer_config("b:9092")
    assert config["security.protocol"] == "SASL_PLAINTEXT"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl.username"], config["sasl.password"]) == ("tracewatch-worker", "s3cret")
    assert config["enable.idempotence"] is True
    creds = faust_credentials()
    assert creds.username == "tracewatch-worker" and creds.mechanism.value == "SCRAM-SHA-512"
    assert "s3cret" not in repr(creds)


def test_sasl_without_a_password_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "u")
    monkeypatch.delenv("KAFKA_SASL_PASSWORD", raising=False)
    monkeypatch.delenv("KAFKA_SASL_PASSWORD_FILE", raising=False)
    with pytest.raises(SystemExit, match="KAFKA_SASL_PASSWORD"):
        security()
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "KERBEROS")
    with pytest.raises(SystemExit, match="one of"):
        security()
