"""Synthetic POS/HIS traffic per CONTRACT.md, deterministic from a seed.

Institutions buy coded boxes from suppliers (purchases), then settle them with patients, some
through registered uncoded stock (无码库). Injected at configurable rates: settlement lines with no
scan beyond legacy stock (NO_CODE), commodity barcodes scanned instead of trace codes
(WRONG_BARCODE), garbled scans (INVALID_CODE), codes of another product (PRODUCT_MISMATCH), and
the habits of real client software: retries of the same event, and malformed messages.

`python -m loadtest.generator OUT_DIR` writes catalog.jsonl, institutions.jsonl, events.jsonl.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

CST = timezone(timedelta(hours=8))


@dataclass(frozen=True, slots=True)
class Rates:
    no_code: float = 0.02
    wrong_barcode: float = 0.01
    invalid_code: float = 0.01
    product_mismatch: float = 0.01
    retry: float = 0.03
    malformed: float = 0.005


def _ean13(payload12: str) -> str:
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(payload12))
    return payload12 + str((10 - total % 10) % 10)


class Generator:
    def __init__(self, seed: int = 7, products: int = 40, institutions: int = 30) -> None:
        self.rng = random.Random(seed)
        self.catalog: list[dict[str, Any]] = []
        for i in range(products):
            exempt = i % 13 == 12
            self.catalog.append(
                {
                    "product": f"XA{i:08d}",
                    "name": f"Product {i}",
                    "prefixes": [f"8{i + 100000:06d}"],
                    "gtins": [],
                    "pack_size": self.rng.choice([6, 10, 12, 24, 30, 60]),
                    "code_required": not exempt,
                }
            )
        kinds = ["pharmacy", "hospital", "clinic"]
        self.institutions = [
            {
                "institution": f"P{j:05d}",
                "name": f"Institution {j}",
                "kind": kinds[j % 3],
                "region": f"{330100 + (j % 5) * 100}",
            }
            for j in range(institutions)
        ]
        self._serial = 0
        self._event = 0
        self.clock = datetime(2026, 3, 2, 8, 0, tzinfo=CST)

    def _code(self, product: dict[str, Any]) -> str:
        self._serial += 1
        return f"{product['prefixes'][0]}{self._serial:013d}"

    def _next_id(self, prefix: str) -> str:
        self._event += 1
        return f"{prefix}{self._event:08d}"

    def _tick(self) -> str:
        self.clock += timedelta(seconds=self.rng.randint(1, 30))
        return self.clock.isoformat()

    def events(self, count: int, rates: Rates = Rates()) -> Iterator[bytes]:
        """Yields `count` messages (JSON lines, retries and malformed ones included)."""
        rng = self.rng
        stock: dict[str, dict[str, list[str]]] = {i["institution"]: {} for i in self.institutions}
        coded = [p for p in self.catalog if p["code_required"]]
        emitted = 0
        for inst in self.institutions:  # opening legacy stock for a few products
            for product in rng.sample(coded, 2):
                event = {
                    "event_id": self._next_id("L"),
                    "type": "legacy_stock",
                    "institution": inst["institution"],
                    "occurred_at": self._tick(),
                    "product": product["product"],
                    "quantity": rng.randint(1, 3),
                    "unit": "pack",
                }
                yield orjson.dumps(event)
                emitted += 1
        while emitted < count:
            inst_id: str = rng.choice(self.institutions)["institution"]
            product = rng.choice(self.catalog)
            shelf = stock[inst_id].setdefault(product["product"], [])
            if len(shelf) < 2:
                boxes = [self._code(product) for _ in range(rng.randint(4, 12))]
                shelf.extend(boxes)
                event = self._lines_event("purchase", inst_id, product, boxes, len(boxes))
            else:
                event = self._settlement(inst_id, product, shelf, rates)
            line = orjson.dumps(event)
            yield line
            emitted += 1
            if rng.random() < rates.retry and emitted < count:
                yield line  # client retry: the identical upload again
                emitted += 1
            if rng.random() < rates.malformed and emitted < count:
                yield rng.choice([b"{not json", b'{"type": "sale"}', b"[1, 2, 3]"])
                emitted += 1

    def _lines_event(
        self, etype: str, inst: str, product: dict[str, Any], codes: list[str], packs: int
    ) -> dict[str, Any]:
        return {
            "event_id": self._next_id("E"),
            "type": etype,
            "institution": inst,
            "occurred_at": self._tick(),
            "lines": [
                {
                    "line_no": 1,
                    "product": product["product"],
                    "quantity": packs,
                    "unit": "pack",
                    "codes": codes,
                }
            ],
        }

    def _settlement(
        self, inst: str, product: dict[str, Any], shelf: list[str], rates: Rates
    ) -> dict[str, Any]:
        rng = self.rng
        packs = rng.randint(1, min(2, len(shelf)))
        codes = [shelf.pop() for _ in range(packs)]
        roll = rng.random()
        if not product["code_required"] or roll < rates.no_code:
            codes = []
        elif roll < rates.no_code + rates.wrong_barcode:
            codes[0] = _ean13("69" + product["prefixes"][0][1:] + "0000")
        elif roll < rates.no_code + rates.wrong_barcode + rates.invalid_code:
            codes[0] = codes[0][:-3]
        elif (
            roll < rates.no_code + rates.wrong_barcode + rates.invalid_code + rates.product_mismatch
        ):
            other = rng.choice([p for p in self.catalog if p is not product and p["code_required"]])
            codes[0] = self._code(other)
        event = self._lines_event("settlement", inst, product, codes, packs)
        event["settlement_id"] = self._next_id("S")
        event["patient"] = f"pt{rng.randint(1, 5000):05d}"
        return event


def write_dataset(out_dir: str, events: int, seed: int = 7) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    gen = Generator(seed)
    paths = {
        "catalog": os.path.join(out_dir, "catalog.jsonl"),
        "institutions": os.path.join(out_dir, "institutions.jsonl"),
        "events": os.path.join(out_dir, "events.jsonl"),
    }
    with open(paths["catalog"], "wb") as fh:
        fh.writelines(orjson.dumps(p) + b"\n" for p in gen.catalog)
    with open(paths["institutions"], "wb") as fh:
        fh.writelines(orjson.dumps(i) + b"\n" for i in gen.institutions)
    with open(paths["events"], "wb") as fh:
        fh.writelines(line + b"\n" for line in gen.events(events))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic catalog and event stream.")
    parser.add_argument("out_dir")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    for name, path in write_dataset(args.out_dir, args.events, args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
