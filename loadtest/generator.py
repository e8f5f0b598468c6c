"""Synthetic POS/HIS traffic per CONTRACT.md with injected fraud and its ground truth.

Deterministic from a seed. The simulation runs in event time: suppliers deliver coded boxes to
pharmacies, hospitals and clinics; patients buy whole packs (pharmacies) or split packs
(hospitals, 拆零); settlements come with their 进销存 sale records; patients return drugs,
settlements are cancelled, cash sales voided, boxes transferred, stock counted, uncoded legacy
stock (无码库) registered and drawn down. Client habits: purchases, sale records, some cash
sales with their same-day returns, and stock counts of some institutions come in nightly batches
(late, after other institutions' real-time events and the same institution's later settlements),
clients retry identical uploads, scanners spell one code several ways (GS1 in any AI order,
Digital Link URIs), some whole-pack lines give their quantity in units, hospitals sell long
series of one tablet from a strip, legacy stock is drawn down in fractions of a pack, a few
institutions go quiet for good, and some messages are malformed.

Fraud is injected at configurable rates, each kind on boxes chosen so that it raises exactly the
alerts written to the ground truth - recycled boxes resold elsewhere, double settlement, split
overflow, missing codes, commodity barcodes, garbled scans, swapped products, unknown codes,
returns of boxes never sold, cancellations of unknown settlements, sales with no purchase,
inflated stock counts. Incidental consequences are tracked, not guessed: a reference model of
the contract's rules in event time (`_Truth`) records what a dispense or count must raise - a
recycled box sold where it was never received is NO_PROVENANCE too, and it may push that
institution's ledger below zero (OVERSOLD).

Ground truth is a set of keys `rule|institution|code-or-product|event_id` (`truth_key`), the
same key `loadtest.score` derives from an alert.

`python -m loadtest.generator OUT_DIR` writes catalog.jsonl, institutions.jsonl, events.jsonl
and truth.json.
"""

from __future__ import annotations

import argparse
import os
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from detectors.event_time import DEFAULT_IDLE_SECONDS as IDLE_SECONDS
from detectors.event_time import LaneClock, TimeFrame, effective_marks
from detectors.stage import lane_of

CST = timezone(timedelta(hours=8))
GRACE_SECONDS = 72 * 3600
OVERSOLD_TOLERANCE = 0.5  # units; must match the ledger's default
START = datetime(2026, 3, 2, 8, 0, tzinfo=CST)


@dataclass(frozen=True, slots=True)
class Rates:
    """Per settlement (fraud) or per event (client habits) probabilities."""

    no_code: float = 0.01
    wrong_barcode: float = 0.01
    invalid_code: float = 0.01
    product_mismatch: float = 0.008
    unknown_code: float = 0.005
    recycled: float = 0.01
    double_settlement: float = 0.006
    split_overflow: float = 0.3  # of split boxes used up: one more dispense from it
    return_without_sale: float = 0.004
    cancel_unknown: float = 0.002
    phantom_sale: float = 0.004
    false_count: float = 0.2  # of stock counts
    retry: float = 0.03
    malformed: float = 0.003

    def scaled(self, factor: float) -> Rates:
        """Every fraud rate times `factor` (client habits unchanged): a livelier demo."""
        habits = {"retry", "malformed", "split_overflow", "false_count"}
        return Rates(
            **{
                name: value if name in habits else value * factor
                for name, value in ((f, getattr(self, f)) for f in self.__dataclass_fields__)
            }
        )


def truth_key(rule: str, institution: str, subject: str | None, event_id: str) -> str:
    return f"{rule}|{institution}|{subject or ''}|{event_id}"


def _ean13(payload12: str) -> str:
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(payload12))
    return payload12 + str((10 - total % 10) % 10)


def _gtin14(payload13: str) -> str:
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(payload13))
    return payload13 + str((10 - total % 10) % 10)


def _garble(box: Box) -> str:
    """A scan that is no code: a digit lost (20-digit code) or a wrong GTIN check digit."""
    if not box.serial:
        return box.code[:-3]
    gtin = box.product["gtins"][0]
    wrong = str((int(gtin[-1]) + 1) % 10)
    return f"01{gtin[:-1]}{wrong}21{box.serial}"


_FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")


@dataclass(slots=True)
class Box:
    code: str  # normalised key
    product: dict[str, Any]
    inst: str
    used: float = 0  # split units dispensed
    serial: str = ""


@dataclass(slots=True)
class Sold:
    box: Box
    event_id: str
    settlement_id: str | None
    units: float


@dataclass(slots=True)
class _Truth:
    """A reference model of the rules whose outcome depends on history, in event time."""

    keys: set[str] = field(default_factory=set)
    receivers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    recording: set[str] = field(default_factory=set)  # institutions recording codes on receipt
    ledger: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # dispenses of codes never received where they were dispensed: NO_PROVENANCE once the run's
    # last watermark is past their grace period
    unreceived: list[tuple[str, str, str, int]] = field(default_factory=list)
    # ledger checks run in event time too: they fire once the watermark passes ts + grace
    parked: list[tuple[str, str, str, str, int]] = field(default_factory=list)

    def add(self, rule: str, inst: str, subject: str | None, event_id: str) -> None:
        self.keys.add(truth_key(rule, inst, subject, event_id))

    def received(self, inst: str, code: str) -> None:
        self.receivers[code].add(inst)

    def left(self, inst: str, code: str) -> None:
        self.receivers[code].discard(inst)

    def dispensed_code(self, inst: str, code: str, event_id: str, ts: float) -> None:
        if inst in self.recording and inst not in self.receivers[code]:
            self.unreceived.append((inst, code, event_id, int(ts)))

    def stock(self, inst: str, product: str, units: float) -> None:
        self.ledger[f"{inst}|{product}"] += units

    def dispensed_units(
        self, inst: str, product: str, units: float, event_id: str, ts: float
    ) -> None:
        key = f"{inst}|{product}"
        before = self.ledger[key]
        self.ledger[key] = before - units
        if before >= -OVERSOLD_TOLERANCE and before - units < -OVERSOLD_TOLERANCE:
            self.parked.append(("OVERSOLD", inst, product, event_id, int(ts)))

    def counted(self, inst: str, product: str, units: float, event_id: str, ts: float) -> None:
        key = f"{inst}|{product}"
        if abs(units - self.ledger[key]) > OVERSOLD_TOLERANCE:
            self.parked.append(("STOCK_COUNT_MISMATCH", inst, product, event_id, int(ts)))
        self.ledger[key] = units


class Generator:
    def __init__(
        self,
        seed: int = 7,
        products: int = 40,
        institutions: int = 30,
        days: float = 8.0,
        rates: Rates = Rates(),
        start: datetime = START,
    ) -> None:
        self.rng = random.Random(seed)
        self.start = start
        self.rates = rates
        self.days = days
        self.catalog: list[dict[str, Any]] = []
        for i in range(products):
            exempt = i % 13 == 12
            gs1 = i % 5 == 4
            self.catalog.append(
                {
                    "product": f"XA{i:08d}",
                    "name": f"Product {i}",
                    "prefixes": [] if gs1 else [f"8{i + 100000:06d}"],
                    "gtins": [_gtin14(f"0690{i + 100000:06d}000")] if gs1 else [],
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
        # clinics j % 6 == 2 record no codes on receipt; pharmacies upload 进销存 in daily batches
        self.recording = {i["institution"] for j, i in enumerate(self.institutions) if j % 6 != 2}
        self.kinds = {i["institution"]: i["kind"] for i in self.institutions}
        self.batching = {i for i, kind in self.kinds.items() if kind == "pharmacy"}
        self._serial = 0
        self._n = 0

    # -- ids, codes, time ------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n:08d}"

    def _box(self, product: dict[str, Any], inst: str) -> Box:
        self._serial += 1
        if product["gtins"]:
            serial = f"s{self._serial:09d}"
            return Box(f"01{product['gtins'][0]}21{serial.upper()}", product, inst, serial=serial)
        return Box(f"{product['prefixes'][0]}{self._serial:013d}", product, inst)

    def _scan(self, box: Box) -> str:
        """How a scanner sends the box's code: mostly clean, sometimes in another spelling."""
        roll = self.rng.random()
        if box.serial:
            gtin = box.product["gtins"][0]
            if roll < 0.25:
                return f"(01){gtin}(21){box.serial}"
            if roll < 0.4:
                return f"]d201{gtin}21{box.serial}"
            if roll < 0.5:  # expiry and batch first: GS1 allows any AI order
                return f"(17)281231(10)B{self._serial % 9999:04d}(01){gtin}(21){box.serial}"
            if roll < 0.55:
                return f"]d21728123110B77\x1d01{gtin}21{box.serial}"
            if roll < 0.6:
                return f"https://id.gs1.org/01/{gtin}/21/{box.serial}?17=281231"
            return f"01{gtin}21{box.serial}"
        if roll < 0.05:
            return f" {box.code} "
        if roll < 0.08:
            return box.code.translate(_FULLWIDTH)
        return box.code

    # -- the simulation ----------------------------------------------------------------------------

    def generate(self, count: int) -> tuple[list[bytes], set[str], dict[str, int]]:
        """`count` messages in delivery order, the ground truth, and counts of legitimate
        repeats that must not alert."""
        sim = _Simulation(self, count)
        return sim.run()

    def events(self, count: int) -> Iterator[bytes]:
        yield from self.generate(count)[0]


class _Simulation:
    def __init__(self, gen: Generator, count: int) -> None:
        self.g = gen
        self.rng = gen.rng
        self.r = gen.rates
        self.count = count
        self.span = gen.days * 86400
        self.step = self.span / max(1, count)
        self.t = gen.start.timestamp()
        self.truth = _Truth()
        self.truth.recording = set(gen.recording)
        self.own: dict[str, int] = {}  # newest event time per institution
        self.out: list[tuple[float, int, bytes]] = []  # (delivery time, seq, message)
        self.shelf: dict[str, dict[str, list[Box]]] = defaultdict(lambda: defaultdict(list))
        self.open_split: dict[str, list[Box]] = defaultdict(list)
        self.used_up: dict[str, list[Box]] = defaultdict(list)
        self.sold: dict[str, list[Sold]] = defaultdict(list)  # whole packs, not returned
        self.cash: dict[str, list[Sold]] = defaultdict(list)  # voidable cash sales
        self.settlements: dict[str, list[tuple[str, list[Box], float, str]]] = defaultdict(list)
        self.legacy: dict[str, float] = defaultdict(float)
        self.never: dict[str, dict[str, Any]] = {}  # inst -> product it never stocks (phantoms)
        self.legit: dict[str, int] = defaultdict(int)
        self.emitted = 0
        self.coded = [p for p in gen.catalog if p["code_required"]]

    def now(self) -> str:
        """Event times are whole seconds: what the detectors keep, so truth and alerts agree."""
        return datetime.fromtimestamp(int(self.t), CST).isoformat()

    def emit(self, event: dict[str, Any], inst: str, batch: bool = False) -> None:
        """Deliver now, or with the institution's next daily batch (01:00 next day)."""
        deliver = self.t
        if batch and inst in self.g.batching:
            day = datetime.fromtimestamp(self.t, CST).date() + timedelta(days=1)
            deliver = datetime(day.year, day.month, day.day, 1, 0, tzinfo=CST).timestamp()
            deliver += self.rng.random() * 60
        raw = orjson.dumps(event)
        self.own[inst] = max(self.own.get(inst, 0), int(self.t))
        self.out.append((deliver, len(self.out), raw))
        self.emitted += 1
        if self.rng.random() < self.r.retry:
            self.out.append((deliver + 1, len(self.out), raw))  # client retry: identical upload
            self.emitted += 1
            self.legit["retries"] += 1
        if self.rng.random() < self.r.malformed:
            bad = self.rng.choice([b"{not json", b'{"type": "sale"}', b"[1, 2, 3]", b"\xff\xfe"])
            self.out.append((self.t, len(self.out), bad))
            self.emitted += 1

    def base(self, etype: str, inst: str, prefix: str = "E") -> dict[str, Any]:
        return {
            "event_id": self.g._id(prefix),
            "type": etype,
            "institution": inst,
            "occurred_at": self.now(),
        }

    def run(self) -> tuple[list[bytes], set[str], dict[str, int]]:
        insts = [i["institution"] for i in self.g.institutions]
        for inst in insts:  # opening: a product never stocked, legacy stock, first deliveries
            self.never[inst] = self.rng.choice(self.coded)
            coded = [p for p in self.coded if p is not self.never[inst]]
            for product in self.rng.sample(coded, 2):
                self.register_legacy(inst, product)
            for product in self.rng.sample(coded, 6):
                self.purchase(inst, product, realtime=True)
        start = self.t
        # two institutions go quiet for good after a third of the stream, the last thing they
        # send a sale of a box they never bought: its checks are decided by the idle bound
        quiet, active = insts[-2:], insts
        while self.emitted < self.count:
            # event time keeps pace with the messages written, so the stream spans `days`
            pace = start + self.span * self.emitted / self.count
            self.t = max(self.t + self.rng.expovariate(1 / self.step), pace)
            if active is insts and self.emitted >= self.count // 3:
                for inst in quiet:
                    self.fraud_phantom(inst)
                    self.legit["quiet_institutions"] += 1
                active = insts[:-2]
            inst = self.rng.choice(active)
            self.act(inst)
        self.out.sort()
        # a parked check stands once event time at its institution has passed the grace period:
        # its lane's watermark (robust to one fast clock), at least the idle bound behind the
        # others; the ledger's checks also by the institution's own time
        clock = LaneClock()
        for inst, ts in self.own.items():
            clock.observe(inst, lane_of(inst), ts)
        frame = TimeFrame(effective_marks(clock.tops(), IDLE_SECONDS))
        for inst, code, eid, ts in self.truth.unreceived:
            if ts + GRACE_SECONDS <= frame.at(lane_of(inst)):
                self.truth.add("NO_PROVENANCE", inst, code, eid)
        seen_by = _ledger_own_times([raw for _, _, raw in self.out])
        for rule, where, product_code, eid, ts in self.truth.parked:
            own = seen_by.get(f"{where}|{product_code}", 0)
            if ts + GRACE_SECONDS <= max(frame.at(lane_of(where)), own):
                self.truth.add(rule, where, product_code, eid)
        return [raw for _, _, raw in self.out], self.truth.keys, dict(self.legit)

    def stockable(self, inst: str) -> list[dict[str, Any]]:
        return [p for p in self.g.catalog if p is not self.never[inst]]

    def act(self, inst: str) -> None:
        rng = self.rng
        roll = rng.random()
        hospital = self.g.kinds[inst] == "hospital"
        if roll < 0.08:
            self.purchase(inst, rng.choice(self.stockable(inst)))
        elif roll < 0.12:
            self.sale_return(inst)
        elif roll < 0.14:
            self.cancel(inst)
        elif roll < 0.16:
            self.void_cash_sale(inst)
        elif roll < 0.18:
            self.transfer(inst)
        elif roll < 0.22:
            self.count_stock(inst)
        elif roll < 0.26:
            self.cash_sale(inst)
        elif hospital and roll < 0.5:
            self.split_dispense(inst)
        else:
            self.settle(inst)

    # -- flows -------------------------------------------------------------------------------------

    def register_legacy(self, inst: str, product: dict[str, Any]) -> None:
        packs = self.rng.randint(1, 3)
        event = self.base("legacy_stock", inst, "L")
        event.update(product=product["product"], quantity=packs, unit="pack")
        units = packs * product["pack_size"]
        self.legacy[f"{inst}|{product['product']}"] += units
        self.truth.stock(inst, product["product"], units)
        self.emit(event, inst)

    def purchase(self, inst: str, product: dict[str, Any], realtime: bool = False) -> None:
        boxes = [self.g._box(product, inst) for _ in range(self.rng.randint(3, 8))]
        records = inst in self.g.recording and product["code_required"]
        event = self.base("purchase", inst)
        event["lines"] = [
            {
                "line_no": 1,
                "product": product["product"],
                "quantity": len(boxes),
                "unit": "pack",
                "codes": [b.code for b in boxes] if records else [],
                "batch": f"B{self.rng.randint(1000, 9999)}",
            }
        ]
        self.shelf[inst][product["product"]].extend(boxes)
        for box in boxes:
            if records:
                self.truth.received(inst, box.code)
        self.truth.stock(inst, product["product"], len(boxes) * product["pack_size"])
        if not realtime and inst in self.g.batching:
            self.legit["late_purchases"] += 1
        self.emit(event, inst, batch=not realtime)

    def take(self, inst: str, product: dict[str, Any], n: int) -> list[Box]:
        shelf = self.shelf[inst][product["product"]]
        if len(shelf) < n:
            self.purchase(inst, product, realtime=inst not in self.g.batching)
            self.t += 60
        return [shelf.pop(self.rng.randrange(len(shelf))) for _ in range(n)]

    def line(
        self, product: dict[str, Any], qty: float, codes: list[str], **kw: Any
    ) -> dict[str, Any]:
        return {
            "line_no": 1,
            "product": product["product"],
            "quantity": qty,
            "unit": "pack",
            "codes": codes,
            **kw,
        }

    def dispense_event(
        self, etype: str, inst: str, lines: list[dict[str, Any]], sid: str | None
    ) -> dict[str, Any]:
        event = self.base(etype, inst, "S" if etype == "settlement" else "E")
        if sid is not None:
            event["settlement_id"] = sid
        if etype == "settlement":
            event["patient"] = f"pt{self.rng.randint(1, 5000):05d}"
        event["lines"] = lines
        return event

    def settle(self, inst: str) -> None:
        rng, r = self.rng, self.r
        fraud = rng.random()
        edges = [
            ("recycled", r.recycled),
            ("double", r.double_settlement),
            ("rws", r.return_without_sale),
            ("cancel_unknown", r.cancel_unknown),
            ("phantom", r.phantom_sale),
        ]
        acc = 0.0
        for name, rate in edges:
            acc += rate
            if fraud < acc:
                getattr(self, f"fraud_{name}")(inst)
                return
        product = rng.choice(self.stockable(inst))
        key = f"{inst}|{product['product']}"
        sid = self.g._id("SID")
        if not product["code_required"]:  # exempt (e.g. 中药饮片): bought and sold unscanned
            packs = rng.randint(1, 2)
            self.take(inst, product, packs)
            self.whole_settlement(inst, product, packs, [], sid, [])
            return
        if self.legacy[key] >= product["pack_size"] and rng.random() < 0.3:
            self.legacy[key] -= product["pack_size"]
            self.legit["legacy_covered"] += 1
            if rng.random() < 0.3:  # a bottle of legacy stock sold in two parts: 0.45 + 0.55
                self.whole_settlement(inst, product, 0.45, [], sid, [])
                self.t += 60
                self.whole_settlement(inst, product, 0.55, [], self.g._id("SID"), [])
                self.legit["legacy_fractions"] += 1
                return
            self.whole_settlement(inst, product, 1, [], sid, [])
            return
        packs = rng.randint(1, 2)
        boxes = self.take(inst, product, packs)
        scans = [self.g._scan(b) for b in boxes]
        codes = [b.code for b in boxes]  # what the code stage will see per scan
        roll = rng.random()
        ev_rules: list[tuple[str, str | None]] = []
        r1 = r.no_code
        r2 = r1 + r.wrong_barcode
        r3 = r2 + r.invalid_code
        r4 = r3 + r.product_mismatch
        r5 = r4 + r.unknown_code
        if roll < r1 and self.legacy[key] < packs * product["pack_size"]:
            scans, codes = [], []
            ev_rules.append(("NO_CODE", None))
        elif roll < r2:
            pid = product["prefixes"][0][1:] if product["prefixes"] else "123456"
            scans[0] = _ean13("69" + pid + "0000")
            codes[0] = ""
            ev_rules += [("WRONG_BARCODE", None), ("CODE_COUNT_MISMATCH", None)]
        elif roll < r3:
            scans[0] = _garble(boxes[0])
            codes[0] = ""
            ev_rules += [("INVALID_CODE", None), ("CODE_COUNT_MISMATCH", None)]
        elif roll < r4:
            others = [p for p in self.coded if p is not product and self.shelf[inst][p["product"]]]
            if others:
                other = rng.choice(others)
                swapped = self.take(inst, other, 1)[0]
                scans[0] = swapped.code
                codes[0] = swapped.code
                ev_rules.append(("PRODUCT_MISMATCH", swapped.code))
                self.shelf[inst][product["product"]].append(boxes[0])  # its own box stays
        elif roll < r5:
            self.g._serial += 1
            unknown = f"8999999{self.g._serial:013d}"
            scans[0] = unknown
            codes[0] = unknown
            ev_rules.append(("UNKNOWN_CODE", unknown))
        units = not ev_rules and rng.random() < 0.15  # 2 packs of 60 sent as 120 tablets
        self.whole_settlement(
            inst, product, packs, scans, sid, ev_rules, codes=codes, boxes=boxes, in_units=units
        )

    def whole_settlement(
        self,
        inst: str,
        product: dict[str, Any],
        packs: float,
        scans: list[str],
        sid: str,
        ev_rules: list[tuple[str, str | None]],
        codes: list[str] | None = None,
        boxes: list[Box] | None = None,
        in_units: bool = False,
    ) -> str:
        if in_units:
            line = self.line(product, packs * product["pack_size"], scans, unit="unit")
            self.legit["unit_quantity_lines"] += 1
        else:
            line = self.line(product, packs, scans)
        event = self.dispense_event("settlement", inst, [line], sid)
        eid: str = event["event_id"]
        for rule, subject in ev_rules:
            self.truth.add(rule, inst, subject, eid)
        for code in codes or []:
            if code:
                self.truth.dispensed_code(inst, code, eid, self.t)
        self.truth.dispensed_units(
            inst, product["product"], packs * product["pack_size"], eid, self.t
        )
        self.emit(event, inst)
        sold_boxes = [b for b, c in zip(boxes or [], codes or [], strict=False) if c == b.code]
        for box in sold_boxes:
            self.sold[inst].append(Sold(box, eid, sid, 0))
        self.settlements[inst].append(
            (sid, sold_boxes, packs * product["pack_size"], product["product"])
        )
        if self.rng.random() < 0.5:  # its 进销存 sale record, same settlement id
            sale = self.dispense_event("sale", inst, [dict(line)], sid)
            self.legit["sale_and_settlement"] += 1
            self.emit(sale, inst, batch=True)
        return eid

    def cash_sale(self, inst: str) -> None:
        product = self.rng.choice([p for p in self.stockable(inst) if p["code_required"]])
        box = self.take(inst, product, 1)[0]
        event = self.dispense_event(
            "sale", inst, [self.line(product, 1, [self.g._scan(box)])], None
        )
        self.truth.dispensed_code(inst, box.code, event["event_id"], self.t)
        self.truth.dispensed_units(
            inst, product["product"], product["pack_size"], event["event_id"], self.t
        )
        nightly = inst in self.g.batching and self.rng.random() < 0.3
        self.emit(event, inst, batch=nightly)
        if nightly and self.rng.random() < 0.5:
            # the patient brings it back the same day; the POS uploads both that night, after
            # the day's real-time settlements - the box may be resold or transferred meanwhile
            self.t += 600
            back = self.base("sale_return", inst)
            back["original_event_id"] = event["event_id"]
            back["lines"] = [self.line(product, 1, [self.g._scan(box)])]
            self.truth.stock(inst, product["product"], product["pack_size"])
            self.emit(back, inst, batch=True)
            self.shelf[inst][product["product"]].append(box)
            self.legit["nightly_sale_and_return"] += 1
            return
        self.cash[inst].append(Sold(box, event["event_id"], None, product["pack_size"]))

    def split_dispense(self, inst: str) -> None:
        rng = self.rng
        opened = self.open_split[inst]
        if not opened or rng.random() < 0.2:
            product = rng.choice([p for p in self.stockable(inst) if p["code_required"]])
            opened.append(self.take(inst, product, 1)[0])
        box = rng.choice(opened)
        size = box.product["pack_size"]
        # a strip of 30 or 60 is often sold one tablet a day: a long series on one code
        one = size >= 30 and rng.random() < 0.6
        units = min(size - box.used, 1 if one else rng.randint(1, max(1, size // 3)))
        box.used += units
        if box.used >= size:
            opened.remove(box)
            self.used_up[inst].append(box)
        line = self.line(box.product, units, [self.g._scan(box)], unit="unit", split=True)
        event = self.dispense_event("settlement", inst, [line], self.g._id("SID"))
        eid = event["event_id"]
        self.truth.dispensed_code(inst, box.code, eid, self.t)
        self.truth.dispensed_units(inst, box.product["product"], units, eid, self.t)
        self.legit["split_within_pack"] += 1
        self.emit(event, inst)
        if box.used >= size and rng.random() < self.r.split_overflow:
            self.t += 30
            extra = rng.randint(1, max(1, size // 3))
            line = self.line(box.product, extra, [box.code], unit="unit", split=True)
            event = self.dispense_event("settlement", inst, [line], self.g._id("SID"))
            self.truth.add("SPLIT_OVERFLOW", inst, box.code, event["event_id"])
            self.truth.dispensed_units(
                inst, box.product["product"], extra, event["event_id"], self.t
            )
            self.emit(event, inst)
            self.used_up[inst].remove(box)  # one overflow per box

    def sale_return(self, inst: str) -> None:
        sold = self.sold[inst]
        if not sold:
            return
        item = sold.pop(self.rng.randrange(len(sold)))
        product = item.box.product
        event = self.base("sale_return", inst)
        event["original_event_id"] = item.event_id
        event["lines"] = [self.line(product, 1, [self.g._scan(item.box)])]
        self.truth.stock(inst, product["product"], product["pack_size"])
        self.emit(event, inst)
        self.shelf[inst][product["product"]].append(item.box)  # back in stock: may sell again
        self.legit["returns_then_resale_possible"] += 1
        # the settlement it came from can no longer be cancelled whole
        self.settlements[inst] = [s for s in self.settlements[inst] if item.box not in s[1]]

    def cancel(self, inst: str) -> None:
        pending = self.settlements[inst]
        if not pending:
            return
        sid, boxes, units, product = pending.pop(self.rng.randrange(len(pending)))
        event = self.base("settlement_cancel", inst)
        event["settlement_id"] = sid
        self.truth.stock(inst, product, units)
        self.emit(event, inst)
        for box in boxes:
            self.sold[inst] = [s for s in self.sold[inst] if s.box is not box]
            self.shelf[inst][box.product["product"]].append(box)
        self.legit["cancel_then_resale_possible"] += 1

    def void_cash_sale(self, inst: str) -> None:
        if not self.cash[inst]:
            return
        item = self.cash[inst].pop()
        event = self.base("void", inst)
        event["voided_event_id"] = item.event_id
        self.truth.stock(inst, item.box.product["product"], item.units)
        self.emit(event, inst)
        self.shelf[inst][item.box.product["product"]].append(item.box)
        self.legit["voids"] += 1

    def transfer(self, inst: str) -> None:
        products = [p for p, boxes in self.shelf[inst].items() if len(boxes) > 1]
        if not products:
            return
        # sorted: a set's order changes with the process's hash seed, and the stream must not
        target = self.rng.choice(sorted(i for i in self.g.recording if i != inst))
        name = self.rng.choice(products)
        box = self.shelf[inst][name][-1]
        if box.product is self.never[target]:
            return
        self.shelf[inst][name].pop()
        size = box.product["pack_size"]
        for who, qty, reason in ((inst, -1, "transfer_out"), (target, 1, "transfer_in")):
            event = self.base("stock_change", who)
            event.update(product=name, quantity=qty, unit="pack", reason=reason, codes=[box.code])
            self.truth.stock(who, name, qty * size)
            if reason == "transfer_out":
                self.truth.left(who, box.code)
            else:
                self.truth.received(who, box.code)
            self.emit(event, who)
        box.inst = target
        self.shelf[target][name].append(box)
        self.legit["transfers"] += 1

    def count_stock(self, inst: str) -> None:
        stocked = [p for p in self.shelf[inst] if f"{inst}|{p}" in self.truth.ledger]
        if not stocked:
            return
        name = self.rng.choice(stocked)
        units = self.truth.ledger[f"{inst}|{name}"]
        if units < 0:
            return  # an oversold ledger: counting it is the next inspector's job
        if self.rng.random() < self.r.false_count:
            size = next(p["pack_size"] for p in self.g.catalog if p["product"] == name)
            units += self.rng.randint(1, 3) * size  # stock inflated to cover missing boxes
        event = self.base("stock_count", inst)
        event.update(product=name, quantity=units, unit="unit")
        self.truth.counted(inst, name, units, event["event_id"], self.t)
        # taken during the day, uploaded in the nightly batch after the day's sales
        self.emit(event, inst, batch=self.rng.random() < 0.5)

    # -- frauds with no normal flow around them ----------------------------------------------------

    def fraud_recycled(self, inst: str) -> None:
        """A box sold to a patient elsewhere, bought back, and settled here (回流药)."""
        donors = [i for i, s in self.sold.items() if i != inst and s]
        if donors:
            self.resell(self.rng.choice(donors), inst, "CROSS_INSTITUTION_SALE")

    def fraud_double(self, inst: str) -> None:
        """The same box settled twice at one institution (no return between)."""
        if self.sold[inst]:
            self.resell(inst, inst, "DUPLICATE_SALE")

    def resell(self, seller: str, inst: str, rule: str) -> None:
        """Settle at `inst` a box `seller` sold whole and never took back."""
        item = self.sold[seller].pop(self.rng.randrange(len(self.sold[seller])))
        self.settlements[seller] = [s for s in self.settlements[seller] if item.box not in s[1]]
        product = item.box.product
        event = self.dispense_event(
            "settlement", inst, [self.line(product, 1, [self.g._scan(item.box)])], self.g._id("SID")
        )
        eid = event["event_id"]
        self.truth.add(rule, inst, item.box.code, eid)
        self.truth.dispensed_code(inst, item.box.code, eid, self.t)
        self.truth.dispensed_units(inst, product["product"], product["pack_size"], eid, self.t)
        self.emit(event, inst)

    def fraud_rws(self, inst: str) -> None:
        """A 'return' of a box from the shelf that was never sold."""
        stocked = [
            boxes
            for boxes in self.shelf[inst].values()
            if boxes and boxes[0].product["code_required"]
        ]
        if not stocked:
            return
        box = self.rng.choice(stocked)[0]
        event = self.base("sale_return", inst)
        event["lines"] = [self.line(box.product, 1, [box.code])]
        self.truth.add("RETURN_WITHOUT_SALE", inst, box.code, event["event_id"])
        self.truth.stock(inst, box.product["product"], box.product["pack_size"])
        self.emit(event, inst)
        # the box stays on the shelf; the ledger now counts one pack more than there is

    def fraud_cancel_unknown(self, inst: str) -> None:
        event = self.base("settlement_cancel", inst)
        event["settlement_id"] = self.g._id("SIDX")
        self.truth.add("RETURN_WITHOUT_SALE", inst, None, event["event_id"])
        self.emit(event, inst)

    def fraud_phantom(self, inst: str) -> None:
        """A sale of a box that was never bought, of a product never stocked here."""
        product = self.never[inst]
        box = self.g._box(product, inst)
        event = self.dispense_event(
            "settlement", inst, [self.line(product, 1, [self.g._scan(box)])], self.g._id("SID")
        )
        eid = event["event_id"]
        self.truth.dispensed_code(inst, box.code, eid, self.t)
        self.truth.dispensed_units(inst, product["product"], product["pack_size"], eid, self.t)
        self.emit(event, inst)


def _ledger_own_times(delivered: list[bytes]) -> dict[str, float]:
    """Per `institution|product`, the institution's own time (its latest `occurred_at` so far,
    in delivery order) when the last event touching that ledger arrived: a ledger learns its
    institution's time only from its own records (and its lane's time from all of them)."""
    from topics.records import InvalidEvent, parse_event

    own: dict[str, float] = {}
    keys_of: dict[str, set[str]] = {}  # event or settlement -> the ledger keys it touched
    seen: dict[str, float] = {}
    for raw in delivered:
        try:
            event = parse_event(raw)
        except InvalidEvent:
            continue
        inst = event.institution
        own[inst] = max(own.get(inst, event.occurred_ts), event.occurred_ts)
        keys = {f"{inst}|{line.product}" for line in event.lines}
        if event.product is not None:
            keys.add(f"{inst}|{event.product}")
        if event.type == "void":
            keys |= keys_of.get(f"e|{inst}|{event.voided_event_id}", set())
        elif event.type == "settlement_cancel":
            keys |= keys_of.get(f"s|{inst}|{event.settlement_id}", set())
        keys_of[f"e|{inst}|{event.event_id}"] = keys
        if event.settlement_id is not None and event.type != "settlement_cancel":
            keys_of.setdefault(f"s|{inst}|{event.settlement_id}", set()).update(keys)
        for key in keys:
            seen[key] = own[inst]
    return seen


def write_dataset(
    out_dir: str,
    events: int,
    seed: int = 7,
    days: float = 8.0,
    rates: Rates = Rates(),
    start: datetime = START,
) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    gen = Generator(seed, days=days, rates=rates, start=start)
    messages, truth, legit = gen.generate(events)
    paths = {
        "catalog": os.path.join(out_dir, "catalog.jsonl"),
        "institutions": os.path.join(out_dir, "institutions.jsonl"),
        "events": os.path.join(out_dir, "events.jsonl"),
        "truth": os.path.join(out_dir, "truth.json"),
    }
    with open(paths["catalog"], "wb") as fh:
        fh.writelines(orjson.dumps(p) + b"\n" for p in gen.catalog)
    with open(paths["institutions"], "wb") as fh:
        fh.writelines(orjson.dumps(i) + b"\n" for i in gen.institutions)
    with open(paths["events"], "wb") as fh:
        fh.writelines(line + b"\n" for line in messages)
    with open(paths["truth"], "wb") as fh:
        fh.write(
            orjson.dumps(
                {"alerts": sorted(truth), "legitimate_repeats": legit}, option=orjson.OPT_INDENT_2
            )
        )
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic catalog, event stream and truth."
    )
    parser.add_argument("out_dir")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--days", type=float, default=8.0, help="event-time span of the stream")
    args = parser.parse_args(argv)
    for name, path in write_dataset(args.out_dir, args.events, args.seed, args.days).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
