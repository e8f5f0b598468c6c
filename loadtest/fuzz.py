"""`make fuzz`: a mutation fuzzer over the parser, the Redis codecs and the whole replay pipeline.

Seeds are a generated stream's events and hand-written edge cases. Each input is a seed mutated
at the JSON level (a field's value swapped for one of another type, size or range: lists, objects,
huge and non-finite numbers, separators and control characters in ids, dates at the calendar's
ends, thousands of lines or codes) or at the byte level (flips, cuts, splices, repeats). Every
input goes through `parse_event`; what it accepts goes through one long-lived `Pipeline` (so
state builds up as in a real replay), and every state the event touched must survive the Redis
codec's pack -> unpack unchanged.

A finding is any exception other than the parser's `InvalidEvent`, or a round trip that changes
a state. Findings are grouped by exception type and place; one reproducer of each is written
(`--out`), and the exit status is 1 when there are any.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from detectors.catalog import load_catalog
from detectors.pipeline import Pipeline
from loadtest.generator import write_dataset
from streams.codecs import CodeCodec, JsonCodec
from topics.records import InvalidEvent, parse_event

_STRANGE_STRINGS = [
    "",
    " ",
    "\x1e",
    "\x1f",
    "a\x1fb",
    "a\x1eb",
    "?x",
    "|",
    "a|b",
    "\x00",
    "\ud7ff",
    "名",
    "\u200b",
    "x" * 101,
    "x" * 5000,
    "8" * 20,
    "81000010000000000001",
    "]d201069123456789021" + "7" * 10,
    "(01)06912345678902(21)ABC",
    "https://id.gs1.org/01/06912345678902/21/XYZ",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-14:00",
    "2026-03-02T09:00:00",
    "2026-02-30T09:00:00+08:00",
    "2026-03-02T09:00:00+23:59",
    "2026-03-02T09:00:00.123456789+08:00",
    "sale",
    "settlement",
    "void",
    "stock_count",
    "unit",
    "pack",
]
_STRANGE_NUMBERS: list[Any] = [
    0,
    -1,
    1,
    0.5,
    1e-320,
    1e308,
    -1e308,
    2**63,
    -(2**63) - 1,
    10**30,
    1e6,
    1e6 + 1,
    999999.9999,
    True,
    False,
]


def _strange_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if pick < 0.35:
        return rng.choice(_STRANGE_STRINGS)
    if pick < 0.6:
        return rng.choice(_STRANGE_NUMBERS)
    if pick < 0.7:
        return None
    if pick < 0.85 or depth > 2:
        return [_strange_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "line_no", "codes", ""]): _strange_value(rng, depth + 1)}


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return obj


def _mutate_json(rng: random.Random, event: dict[str, Any], seeds: list[dict[str, Any]]) -> Any:
    obj: Any = orjson.loads(orjson.dumps(event))
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(obj))
        path = rng.choice(paths)
        kind = rng.random()
        if kind < 0.55:
            obj = _set(obj, path, _strange_value(rng))
        elif kind < 0.65 and path and isinstance(obj, dict):
            parent = obj
            for step in path[:-1]:
                parent = parent[step]
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, list) and parent:
                parent.pop(path[-1] if path[-1] < len(parent) else 0)
        elif kind < 0.75 and isinstance(obj, dict) and obj.get("lines"):
            lines = obj["lines"]
            # past the parser's 500 lines once, not again: a second or third blow-up made
            # inputs of hundreds of millions of lines (gigabytes) that crashed the fuzzer itself
            if isinstance(lines, list) and lines and len(lines) < 500:
                obj["lines"] = lines * rng.choice([2, 50, 600])
        elif kind < 0.85 and isinstance(obj, dict):
            other = rng.choice(seeds)  # splice a field of another event in
            name = rng.choice(list(other))
            obj[name] = orjson.loads(orjson.dumps(other[name]))
        elif isinstance(obj, dict):
            obj[rng.choice(["event_id", "institution", "settlement_id", "original_event_id"])] = (
                rng.choice(_STRANGE_STRINGS)
            )
    return obj


def _mutate_bytes(rng: random.Random, raw: bytes, seeds: list[bytes]) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        if not data:
            data = bytearray(rng.choice(seeds))
        kind = rng.random()
        i = rng.randrange(len(data))
        if kind < 0.3:
            data[i] = rng.randrange(256)
        elif kind < 0.5:
            del data[i : i + rng.randint(1, 16)]
        elif kind < 0.65:
            data[i:i] = rng.choice([b"\\u0000", b"\x1f", b"\xff", b"[", b"{", b'"', b"1e999", b","])
        elif kind < 0.8:
            other = rng.choice(seeds)
            j = rng.randrange(len(other))
            data[i:] = other[j:]
        else:
            j = min(len(data), i + rng.randint(1, 64))
            data[i:i] = data[i:j] * rng.randint(1, 50)
    return bytes(data)


@dataclass
class Findings:
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, bytes] = field(default_factory=dict)

    def add(self, where: str, raw: bytes) -> None:
        self.counts[where] = self.counts.get(where, 0) + 1
        self.examples.setdefault(where, raw)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    place = f"{os.path.basename(last.filename)}:{last.lineno}" if last else "?"
    return f"{type(exc).__name__} at {place}"


def _check_round_trips(pipeline: Pipeline, keys: tuple[set[str], set[str]]) -> str | None:
    code_keys, ledger_keys = keys
    for key in code_keys:
        state = pipeline.codes.state.get(key)
        if state and CodeCodec.unpack(CodeCodec.pack(state)) != state:
            return f"code state of {key!r} changes in a round trip"
        if CodeCodec.unfield(CodeCodec.field(key)) != key:
            return f"code field {key!r} changes in a round trip"
    for key in ledger_keys:
        state = pipeline.ledger.state.get(key)
        if state and JsonCodec.unpack(JsonCodec.pack(state)) != state:
            return f"ledger state of {key!r} changes in a round trip"
    return None


def run(
    inputs: int,
    seed: int = 1,
    events: int = 2000,
    progress: Callable[[int, Findings], None] | None = None,
    start: int = 0,
    last_input: str | None = None,
) -> Findings:
    """`start`: inputs made but not run before that one (to reach a finding fast: the inputs
    depend on the seed alone); `last_input`: a file that holds the input being run, so a crash
    of the process itself (a C extension) leaves its reproducer behind."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="tracewatch-fuzz-") as tmp:
        data = write_dataset(tmp, events, seed)
        catalog = load_catalog(data["catalog"])
        with open(data["events"], "rb") as fh:
            raw_seeds = [line.strip() for line in fh if line.strip()]
    json_seeds = []
    for raw in raw_seeds:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            json_seeds.append(obj)
    pipeline = Pipeline(catalog)
    findings = Findings()
    for n in range(inputs):
        if n % 5 == 0:
            raw = rng.choice(raw_seeds)  # the stream itself, so state keeps growing
        elif n % 5 in (1, 2, 3):
            obj = _mutate_json(rng, rng.choice(json_seeds), json_seeds)
            try:
                raw = orjson.dumps(obj)
            except (TypeError, orjson.JSONEncodeError):
                # integers past 64 bits: what other JSON writers send
                raw = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
        else:
            raw = _mutate_bytes(rng, rng.choice(raw_seeds), raw_seeds)
        if n < start:
            continue
        if last_input is not None:
            with open(last_input, "wb") as fh:
                fh.write(raw)
        try:
            event = parse_event(raw)
        except InvalidEvent:
            continue
        except Exception as exc:
            findings.add(f"parse: {_where(exc)}", raw)
            continue
        try:
            before = (set(pipeline.codes.state), set(pipeline.ledger.state))
            pipeline.process(event)
        except Exception as exc:
            findings.add(f"pipeline: {_where(exc)}", raw)
            pipeline = Pipeline(catalog)  # a half-applied event must not cause the next finding
            continue
        if n % 7 == 0:  # round trips of what the event touched (new keys and a sample)
            touched = (
                set(pipeline.codes.state) - before[0] or set(list(pipeline.codes.state)[-3:]),
                set(pipeline.ledger.state) - before[1] or set(list(pipeline.ledger.state)[-3:]),
            )
            try:
                problem = _check_round_trips(pipeline, touched)
            except Exception as exc:
                problem = f"codec: {_where(exc)}"
            if problem is not None:
                findings.add(problem.split(" of ")[0] if " of " in problem else problem, raw)
        if progress is not None and n and n % 50_000 == 0:
            progress(n, findings)
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="fuzz-findings", help="folder for one reproducer each")
    parser.add_argument("--start", type=int, default=0, help="skip running the inputs before")
    parser.add_argument("--last-input", help="file holding the input being run (crash hunting)")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def progress(n: int, found: Findings) -> None:
        rate = n / (time.monotonic() - started)
        print(f"{n:>9,} inputs, {found.total} findings, {rate:,.0f} inputs/s", flush=True)

    findings = run(
        args.inputs, args.seed, progress=progress, start=args.start, last_input=args.last_input
    )
    elapsed = time.monotonic() - started
    print(f"{args.inputs:,} inputs in {elapsed:.0f} s: {findings.total} findings")
    if findings.total:
        os.makedirs(args.out, exist_ok=True)
        for i, (where, count) in enumerate(sorted(findings.counts.items())):
            path = os.path.join(args.out, f"finding-{i}.json")
            with open(path, "wb") as fh:
                fh.write(findings.examples[where])
            print(f"  {count:>7}  {where}  ({path})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
