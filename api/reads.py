"""What the API reads of the workers' Redis state, never writing it: the states a settlement
check needs, and a code's history.

The reads go to the very keys the workers own (`streams.redis_state`): ingest's memory of the
institution's input partition, the ledger states of the settlement's products and the code
states of its codes, in one round trip of two replies (ingest's load script, and a script
reading every state field at once; on a Redis Cluster one reply per slot). Input partitions are found the way the
producers place events, by librdkafka's default partitioner (CRC-32 of the institution), which
`tracewatch produce` and the API's gateway use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from detectors import code_state as cs
from detectors.alerts import local_iso
from detectors.catalog import Catalog
from detectors.event_time import LaneClock
from detectors.pipeline import CODE_PART, LEDGER_PART, partition_of
from detectors.precheck import Check, check, state_keys
from detectors.routing import IngestView
from detectors.stage import State, lane_of
from streams.codecs import CodeCodec, JsonCodec
from streams.redis_state import (
    READ_FIELDS,
    IngestStore,
    decode_states,
    is_cluster,
    queue_read_fields,
    read_states,
    state_fields,
)
from streams.settings import Settings
from topics import names
from topics.records import Event

# China Standard Time: the offset stored code times are shown in (the codec keeps no other)
_SHOWN_OFFSET = 480


class StateReader:
    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._ingest = IngestStore(client, settings.redis_prefix, settings.seen_ttl_days)
        self._json = JsonCodec()
        self._code = CodeCodec()
        self._read_fields = client.register_script(READ_FIELDS)
        self._cluster = is_cluster(client)

    async def code_states(self, keys: list[str]) -> dict[str, State]:
        s = self._settings
        return await read_states(
            self._client,
            s.redis_prefix,
            CODE_PART,
            s.state_buckets,
            names.BY_CODE.partitions,
            keys,
            self._code,
        )

    async def check(self, event: Event, catalog: Catalog) -> tuple[Check, bool]:
        """The would-be verdict, and whether the event was submitted already (seen by the
        stream, or accepted by an API process and not yet routed)."""
        s = self._settings
        ledger_keys, code_keys = state_keys(event)
        partition = partition_of(event.institution, names.EVENTS.partitions)
        lookups = IngestView.lookups(event)

        ledger_at = state_fields(
            s.redis_prefix,
            LEDGER_PART,
            s.state_buckets,
            names.BY_LEDGER.partitions,
            ledger_keys,
            self._json,
        )
        code_at = state_fields(
            s.redis_prefix,
            CODE_PART,
            s.state_buckets,
            names.BY_CODE.partitions,
            code_keys,
            self._code,
        )
        fields = [*ledger_at, *code_at]
        submitted = [submitted_key(s.redis_prefix, event.key)]

        # One round trip of two replies for everything (each reply costs the client CPU); on a
        # cluster, a reply per slot.
        def pipeline() -> tuple[Any, Callable[[Sequence[Any]], list[Any]]]:
            pipe = self._client.pipeline(transaction=False)
            self._ingest.queue_load(pipe, partition, [event.key], lookups, [event.institution])
            _n, assemble = queue_read_fields(
                pipe, self._read_fields.sha, fields, submitted, self._cluster
            )
            return pipe, assemble

        pipe, assemble = pipeline()
        try:
            ingest_reply, *replies = await pipe.execute()
        except NoScriptError:  # Redis restarted or flushed its scripts since start
            await self._ingest.load_scripts()
            await self._client.script_load(READ_FIELDS)
            pipe, assemble = pipeline()
            ingest_reply, *replies = await pipe.execute()
        values = assemble(replies)
        ingest = IngestStore.decode_load(ingest_reply, [event.key], lookups, [event.institution])
        n = len(ledger_keys)
        ledger = decode_states(ledger_keys, values[:n], self._json)
        codes = decode_states(code_keys, values[n : n + len(code_keys)], self._code)
        accepted = values[-1] is not None
        clock = LaneClock()
        lane = lane_of(event.institution)
        if event.institution in ingest.own:
            clock.observe(event.institution, lane, ingest.own[event.institution])
        own = clock.observe(event.institution, lane, event.occurred_ts)
        view = IngestView(ingest.index, ingest.receivers)
        result = check(event, catalog, view, own, ledger, codes, s.grace_hours * 3600)
        return result, accepted or ingest.seen[0] is not None


def submitted_key(prefix: str, event_key: str) -> str:
    """Where an API process marks an event the broker confirmed (its content digest), so a
    retried request is answered `duplicate` before any worker has seen the event."""
    return f"{prefix}:api:ev:{event_key}"


def code_history(key: str, entry: State | None, viewer: str | None) -> dict[str, Any]:
    """A box's history as NHSA's trace query shows it: receipts and departures, dispenses and
    what undid them, returns no sale matched; `viewer`: the institution whose part alone is
    shown (None: everything, for inspectors). The summary counts every institution: it is what
    a patient scanning the box is told."""
    entry = entry or {}
    dispenses: list[list[Any]] = entry.get("d", [])
    standing_at: dict[str, bool] = {}  # institution -> sold there whole (False: by split only)
    for d in dispenses:
        if not d[cs.RET]:
            standing_at[d[cs.INST]] = standing_at.get(d[cs.INST], False) or not d[cs.UNITS]
    sales = sum(
        1 if not whole else _whole_sales(dispenses, inst) for inst, whole in standing_at.items()
    )
    summary = "no_sale" if sales == 0 else "one_sale" if sales == 1 else "sold_more_than_once"
    timed: list[tuple[float, int, dict[str, Any]]] = []  # (event time, order, entry)
    for h in entry.get("h", ()):
        kind = "receipt" if h[cs.H_KIND] > 0 else "departure"
        timed.append(
            (
                h[cs.H_TS],
                0,
                {
                    "type": kind,
                    "institution": h[cs.H_INST],
                    "occurred_at": local_iso(h[cs.H_TS], _SHOWN_OFFSET),
                },
            )
        )
    for d in dispenses:
        timed.append(
            (
                d[cs.TS],
                1,
                {
                    "type": "dispense",
                    "institution": d[cs.INST],
                    "event_id": d[cs.EV],
                    "settlement_id": d[cs.DK][2:] if d[cs.DK].startswith("s:") else None,
                    "occurred_at": local_iso(d[cs.TS], d[cs.OFF]),
                    "units": d[cs.UNITS] / 1000 if d[cs.UNITS] else "whole pack",
                    "rules": [cs.RULE_OF[letter] for letter in d[cs.STANDING]],
                },
            )
        )
        if d[cs.RET]:
            timed.append(
                (
                    d[cs.RET],
                    2,
                    {
                        "type": "return",
                        "institution": d[cs.INST],
                        "event_id": d[cs.UNDONE] or None,
                        "returns_event_id": d[cs.EV],
                        "occurred_at": local_iso(d[cs.RET], d[cs.OFF]),
                    },
                )
            )
    for u in entry.get("ur", ()):
        timed.append(
            (
                u[cs.U_TS],
                2,
                {
                    "type": "return_without_sale",
                    "institution": u[cs.U_INST],
                    "event_id": u[cs.U_EV],
                    "occurred_at": local_iso(u[cs.U_TS], u[cs.U_OFF]),
                },
            )
        )
    timed.sort(key=lambda t: (t[0], t[1], t[2]["institution"]))
    events = [e for _ts, _order, e in timed]
    if viewer is not None:
        events = [e for e in events if e["institution"] == viewer]
    return {
        "code": key,
        "product": entry.get("p"),
        "known": bool(entry),
        "summary": summary,
        "standing_sales": sales,
        "history": events,
    }


def _whole_sales(dispenses: list[list[Any]], inst: str) -> int:
    return sum(1 for d in dispenses if d[cs.INST] == inst and not d[cs.RET] and not d[cs.UNITS])
