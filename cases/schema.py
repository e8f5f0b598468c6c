"""Versioned SQL migrations (`cases/migrations/NNNN_name.sql`), applied in order, once each.

Every process that uses the store calls `migrate` at start: under an advisory lock, so two
starting at once apply each file once; a file already applied whose text has changed since is
refused (a migration is never edited: add the next one).
"""

from __future__ import annotations

import hashlib
from importlib import resources

import psycopg

_LOCK = 0x7477_6361_7365  # "twcase": one advisory lock for migrations


class MigrationError(RuntimeError):
    pass


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every migration shipped, in order."""
    found = []
    for entry in resources.files("cases.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql"):
            found.append((int(name.split("_", 1)[0]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply what is missing; returns the names applied now."""
    applied_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, sha256 text NOT NULL, applied_at timestamptz NOT NULL "
            "DEFAULT now())"
        )
        done = {
            version: (name, digest)
            for version, name, digest in conn.execute(
                "SELECT version, name, sha256 FROM schema_migrations"
            ).fetchall()
        }
        for version, name, sql in migrations():
            digest = hashlib.sha256(sql.encode()).hexdigest()
            if version in done:
                if done[version][1] != digest:
                    raise MigrationError(
                        f"migration {name} was applied with other content: migrations are "
                        "never edited - restore the file and add a new one"
                    )
                continue
            conn.execute(sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                (version, name, digest),
            )
            applied_now.append(name)
    return applied_now
