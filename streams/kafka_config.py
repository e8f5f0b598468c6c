"""Kafka client settings every client of the project shares: bootstrap and security.

The trust boundary (README, "Trust boundary"): on a real cluster every client authenticates
with SASL (SCRAM) and ACLs decide what each principal may read and write - only the gateway
writes the input topic. The variables below carry a principal's credentials; unset, clients
speak PLAINTEXT (the embedded broker and a development cluster).

| variable | meaning |
|---|---|
| `KAFKA_SECURITY_PROTOCOL` | `PLAINTEXT` (default), `SASL_PLAINTEXT`, `SASL_SSL` or `SSL` |
| `KAFKA_SASL_MECHANISM` | `SCRAM-SHA-512` (default), `SCRAM-SHA-256` or `PLAIN` |
| `KAFKA_SASL_USERNAME` | the principal's name |
| `KAFKA_SASL_PASSWORD` / `KAFKA_SASL_PASSWORD_FILE` | its password, or a file holding it (a mounted secret) |
| `KAFKA_SSL_CA_LOCATION` | CA bundle for `SASL_SSL`/`SSL` |
"""

from __future__ import annotations

import os
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL")


def _password() -> str | None:
    path = os.environ.get("KAFKA_SASL_PASSWORD_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            raise SystemExit(f"KAFKA_SASL_PASSWORD_FILE={path!r}: {exc.strerror}") from None
    return os.environ.get("KAFKA_SASL_PASSWORD")


def security() -> dict[str, str]:
    """librdkafka's security settings from the environment (empty for PLAINTEXT)."""
    protocol = os.environ.get("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
    if protocol not in PROTOCOLS:
        raise SystemExit(f"KAFKA_SECURITY_PROTOCOL={protocol!r}: one of {', '.join(PROTOCOLS)}")
    if protocol == "PLAINTEXT":
        return {}
    config = {"security.protocol": protocol}
    if protocol.startswith("SASL"):
        username, password = os.environ.get("KAFKA_SASL_USERNAME"), _password()
        if not username or not password:
            raise SystemExit(
                f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and "
                "KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)"
            )
        config["sasl.mechanism"] = os.environ.get("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
        config["sasl.username"] = username
        config["sasl.password"] = password
    ca = os.environ.get("KAFKA_SSL_CA_LOCATION")
    if ca:
        config["ssl.ca.location"] = ca
    return config


def client_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """A confluent-kafka client's configuration: bootstrap, security, then `overrides`
    (librdkafka names, with dots). librdkafka logs through Python's logging, each kind of
    message at most once a minute (`streams.log_rate`), not straight to stderr."""
    from streams.log_rate import LIBRDKAFKA

    return {"bootstrap.servers": bootstrap, "logger": LIBRDKAFKA, **security(), **overrides}


class BrokerUnreachable(Exception):
    """No broker of the bootstrap list answered: said in one line, not librdkafka's retries."""


def reachable(bootstrap: str, timeout: float = 8.0) -> None:
    """Ask the cluster for its metadata, librdkafka's own log silenced; `BrokerUnreachable`
    within `timeout` seconds if nobody answers. For the one-shot commands: a worker waits
    for its broker instead."""
    import logging

    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("tracewatch.librdkafka.probe")
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    admin = AdminClient(client_config(bootstrap, logger=quiet))
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        reason = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
        raise BrokerUnreachable(
            f"cannot reach the Kafka broker at {bootstrap} within {timeout:.0f} s ({reason}): "
            "is KAFKA_BOOTSTRAP right, and is the broker up?"
        ) from None


def faust_credentials() -> Any:
    """The same principal for Faust's aiokafka clients, or None for PLAINTEXT."""
    config = security()
    if not config:
        return None
    import ssl

    import faust

    context = None
    if config["security.protocol"].endswith("SSL"):
        context = ssl.create_default_context(cafile=config.get("ssl.ca.location"))
    if "sasl.username" not in config:
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=config["sasl.username"],
        password=config["sasl.password"],
        mechanism=config["sasl.mechanism"],
        ssl_context=context,
    )
