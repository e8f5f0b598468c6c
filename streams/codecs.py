"""How stage states and keys look at rest in Redis: one codec per stage, apart from the rules.

The per-code state is the big number at national scale (tens of billions of codes), so it has a
compact text form: fields joined by ASCII unit separators (0x1F), sections by record separators
(0x1E) - the parser refuses control characters in every identifier, so the joins are injective -
times as base-36 seconds since 2024, the first institution's id not repeated, a 20-digit code
stored as 9 binary bytes. Other stages' states are JSON.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from detectors.stage import State

_US = "\x1f"  # between fields
_RS = "\x1e"  # between sections
_EPOCH = 1704067200  # 2024-01-01T00:00Z: keeps stored times short
_DEFAULT_OFFSET = 480  # +08:00, China Standard Time: not stored


class Codec(Protocol):
    def pack(self, state: State) -> bytes: ...
    def unpack(self, raw: bytes) -> State: ...
    def field(self, key: str) -> bytes: ...
    def unfield(self, raw: bytes) -> str: ...


class JsonCodec:
    """Ledger and verdict states: JSON (orjson), keys as UTF-8."""

    @staticmethod
    def pack(state: State) -> bytes:
        return orjson.dumps(state)

    @staticmethod
    def unpack(raw: bytes) -> State:
        state: State = orjson.loads(raw)
        return state

    @staticmethod
    def field(key: str) -> bytes:
        return key.encode()

    @staticmethod
    def unfield(raw: bytes) -> str:
        return raw.decode()


def _b36(n: int) -> str:
    n -= _EPOCH
    sign, n = ("-", -n) if n < 0 else ("", n)
    digits = ""
    while True:
        n, r = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if not n:
            return sign + digits


def _unb36(text: str) -> int:
    return int(text, 36) + _EPOCH


class CodeCodec:
    """The per-code state of `detectors.code_state` (layout in the module docstring)."""

    @staticmethod
    def field(key: str) -> bytes:
        if len(key) == 20 and key.isdigit() and key.isascii():
            return int(key).to_bytes(9, "big")
        return key.encode()

    @staticmethod
    def unfield(raw: bytes) -> str:
        return f"{int.from_bytes(raw, 'big'):020d}" if len(raw) == 9 else raw.decode()

    @staticmethod
    def pack(state: State) -> bytes:
        holdings: list[list[Any]] = state.get("h", [])
        dispenses: list[list[Any]] = state.get("d", [])
        unmatched: list[list[Any]] = state.get("ur", [])
        home = (
            holdings[0][0]
            if holdings
            else dispenses[0][0]
            if dispenses
            else unmatched[0][0]
            if unmatched
            else ""
        )
        due = state.get("due")
        header = [
            state.get("p", ""),
            str(state.get("ps") or ""),
            home,
            "" if due is None else _b36(int(due)),
            "" if due is None else str(state["dl"]),
        ]
        sections = [_US.join(header)]
        for inst, ts, kind in holdings:
            sections.append(_US.join(("h", "" if inst == home else inst, _b36(ts), str(kind))))
        for inst, dk, ev, ts, units, ret, ln, rc, standing, off, undone in dispenses:
            sections.append(
                _US.join(
                    (
                        "d",
                        "" if inst == home else inst,
                        "" if dk == "e:" + ev else dk,
                        ev,
                        _b36(ts),
                        str(units) if units else "",
                        _b36(ret) if ret else "",
                        str(ln),
                        "1" if rc else "",
                        standing,
                        "" if off == _DEFAULT_OFFSET else str(off),
                        undone,
                    )
                )
            )
        for inst, ts, ev, of, ln, off, raw in state.get("ur", ()):
            sections.append(
                _US.join(
                    (
                        "u",
                        "" if inst == home else inst,
                        _b36(ts),
                        ev,
                        of,
                        "" if ln is None else str(ln),
                        "" if off == _DEFAULT_OFFSET else str(off),
                        orjson.dumps(raw).decode() if raw else "",  # JSON escapes 0x1E/0x1F
                    )
                )
            )
        return _RS.join(sections).encode()

    @staticmethod
    def unpack(raw: bytes) -> State:
        header, *sections = raw.decode().split(_RS)
        product, pack, home, due, lane = header.split(_US)
        state: State = {}
        if product:
            state["p"] = product
        if pack:
            state["ps"] = int(pack)
        if due:
            state["due"], state["dl"] = _unb36(due), int(lane)
        holdings: list[list[Any]] = []
        dispenses: list[list[Any]] = []
        unmatched: list[list[Any]] = []
        for section in sections:
            tag, *fields = section.split(_US)
            if tag == "h":
                inst, ts, kind = fields
                holdings.append([inst or home, _unb36(ts), int(kind)])
                continue
            if tag == "u":
                inst, ts, ev, of, ln, off, scan = fields
                unmatched.append(
                    [
                        inst or home,
                        _unb36(ts),
                        ev,
                        of,
                        int(ln) if ln else None,
                        int(off) if off else _DEFAULT_OFFSET,
                        orjson.loads(scan) if scan else "",
                    ]
                )
                continue
            inst, dk, ev, ts, units, ret, ln, rc, standing, off, undone = fields
            dispenses.append(
                [
                    inst or home,
                    dk or "e:" + ev,
                    ev,
                    _unb36(ts),
                    int(units) if units else 0,
                    _unb36(ret) if ret else 0,
                    int(ln),
                    1 if rc else 0,
                    standing,
                    int(off) if off else _DEFAULT_OFFSET,
                    undone,
                ]
            )
        if holdings:
            state["h"] = holdings
        if dispenses:
            state["d"] = dispenses
        if unmatched:
            state["ur"] = unmatched
        return state
