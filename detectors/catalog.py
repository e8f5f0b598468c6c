"""Product catalog index (CONTRACT.md, "Reference data"): product, prefix or GTIN -> product facts.

Immutable once built: a running worker swaps in a whole new `Catalog` when the reference data
changes, so a batch never sees half an update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from biip.checksums import gs1_standard_check_digit


class ReferenceDataError(ValueError):
    """A reference-data file that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Product:
    product: str
    name: str
    prefixes: tuple[str, ...]
    gtins: tuple[str, ...]
    pack_size: int
    code_required: bool
    # the highest price per pack the insurance allows (价格监测), None: no cap; PRICE_ABOVE_CAP
    price_cap: float | None = None

    def units(self, quantity: float, unit: str) -> int:
        """Quantity in thousandths of the smallest dispensing unit, the ledger's currency:
        integers, so sums of fractional packs are exact."""
        return round(quantity * (self.pack_size if unit == "pack" else 1) * 1000)


def product_from_dict(obj: Any, where: str) -> Product:
    if not isinstance(obj, dict):
        raise ReferenceDataError(f"{where}: a catalog entry must be a JSON object")
    product = obj.get("product")
    if not isinstance(product, str) or not product:
        raise ReferenceDataError(f"{where}: product must be a non-empty string")
    pack_size = obj.get("pack_size", 1)
    if isinstance(pack_size, bool) or not isinstance(pack_size, int) or pack_size <= 0:
        raise ReferenceDataError(f"{where}: pack_size must be a positive integer")
    prefixes = obj.get("prefixes") or []
    gtins = obj.get("gtins") or []
    if not isinstance(prefixes, list) or not all(
        isinstance(p, str) and len(p) == 7 and p.isdigit() for p in prefixes
    ):
        raise ReferenceDataError(f"{where}: prefixes must be a list of 7-digit strings")
    if not isinstance(gtins, list) or not all(
        isinstance(g, str) and g.isdigit() and len(g) in (8, 12, 13, 14) for g in gtins
    ):
        raise ReferenceDataError(f"{where}: gtins must be a list of GTIN digit strings")
    for gtin in gtins:
        digit = gs1_standard_check_digit(gtin[:-1])
        if digit != int(gtin[-1]):
            raise ReferenceDataError(
                f"{where}: GTIN {gtin} has a bad check digit (a valid one ends in {digit}): "
                "copy it again from the package or the supplier's master data"
            )
    code_required = obj.get("code_required", True)
    if not isinstance(code_required, bool):
        raise ReferenceDataError(f"{where}: code_required must be true or false")
    price_cap = obj.get("price_cap")
    if price_cap is not None and (
        isinstance(price_cap, bool)
        or not isinstance(price_cap, (int, float))
        or not math.isfinite(price_cap)
        or price_cap <= 0
    ):
        raise ReferenceDataError(f"{where}: price_cap must be a positive number (yuan per pack)")
    return Product(
        product=product,
        name=str(obj.get("name") or ""),
        prefixes=tuple(prefixes),
        # GS1 scans carry GTIN-14; shorter GTINs in the catalog are the same number, zero-padded.
        gtins=tuple(g.zfill(14) for g in gtins),
        pack_size=pack_size,
        code_required=code_required,
        price_cap=None if price_cap is None else float(price_cap),
    )


class Catalog:
    def __init__(self, products: Iterable[Product] = ()) -> None:
        self.by_product: dict[str, Product] = {}
        self.by_prefix: dict[str, Product] = {}
        self.by_gtin: dict[str, Product] = {}
        for p in products:
            self.by_product[p.product] = p
            for prefix in p.prefixes:
                self.by_prefix[prefix] = p
            for gtin in p.gtins:
                self.by_gtin[gtin] = p

    def __len__(self) -> int:
        return len(self.by_product)

    def get(self, product: str) -> Product | None:
        return self.by_product.get(product)

    def products(self) -> Iterator[Product]:
        return iter(self.by_product.values())


def iter_jsonl(lines: Iterable[bytes | str], source: str) -> Iterator[tuple[str, Any]]:
    """Yields (`file:line` location, decoded object) for each non-blank line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            yield where, orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ReferenceDataError(f"{where}: not valid JSON ({exc})") from None


def load_catalog(path: str) -> Catalog:
    """A catalog file, refused whole (naming the file and line) when an entry is bad or two
    entries claim one product, prefix or GTIN: a code must map to one product, and a catalog
    half applied would judge the same box differently before and after the fix."""
    try:
        with open(path, "rb") as fh:
            entries = [
                (where, product_from_dict(obj, where)) for where, obj in iter_jsonl(fh, path)
            ]
    except OSError as exc:
        raise ReferenceDataError(f"{path}: cannot read catalog ({exc.strerror})") from None
    if not entries:
        raise ReferenceDataError(
            f"{path}: no products: with an empty catalog every line's product is unknown; "
            "check that this is the catalog file"
        )
    claimed: dict[tuple[str, str], tuple[str, str]] = {}  # (kind, value) -> (product, where)
    for where, product in entries:
        claims = [("product", product.product)]
        claims += [("prefix", prefix) for prefix in product.prefixes]
        claims += [("GTIN", gtin) for gtin in product.gtins]
        for kind, value in claims:
            first = claimed.setdefault((kind, value), (product.product, where))
            if first[1] == where:
                continue
            if kind == "product":
                raise ReferenceDataError(
                    f"{where}: product {value!r} is listed already ({first[1]}): keep one entry"
                )
            raise ReferenceDataError(
                f"{where}: {kind} {value} of {product.product!r} belongs to {first[0]!r} already "
                f"({first[1]}): a code must map to one product"
            )
    return Catalog(product for _, product in entries)


INSTITUTION_KINDS = frozenset({"pharmacy", "hospital", "clinic"})


@dataclass(frozen=True, slots=True)
class Institution:
    """A designated institution (CONTRACT.md, "Reference data"). `region` is its 6-digit
    administrative division code (e.g. 330100, Hangzhou): inspectors' scopes are its prefixes."""

    institution: str
    name: str
    kind: str
    region: str


def institution_from_dict(obj: Any, where: str) -> Institution:
    if not isinstance(obj, dict):
        raise ReferenceDataError(f"{where}: an institution entry must be a JSON object")
    code = obj.get("institution")
    if not isinstance(code, str) or not code:
        raise ReferenceDataError(f"{where}: institution must be a non-empty string")
    kind = obj.get("kind", "pharmacy")
    if kind not in INSTITUTION_KINDS:
        raise ReferenceDataError(f"{where}: kind must be one of {sorted(INSTITUTION_KINDS)}")
    region = obj.get("region")
    if not isinstance(region, str) or len(region) != 6 or not region.isdigit():
        raise ReferenceDataError(f"{where}: region must be a 6-digit administrative code")
    return Institution(code, str(obj.get("name") or ""), kind, region)


def load_institutions(path: str) -> list[Institution]:
    try:
        with open(path, "rb") as fh:
            found = [institution_from_dict(obj, where) for where, obj in iter_jsonl(fh, path)]
    except OSError as exc:
        raise ReferenceDataError(f"{path}: cannot read institutions ({exc.strerror})") from None
    seen: set[str] = set()
    for inst in found:
        if inst.institution in seen:
            raise ReferenceDataError(f"{path}: institution {inst.institution!r} is listed twice")
        seen.add(inst.institution)
    return found


def region_scope(region: str) -> str:
    """An inspector's scope as the prefix of the region codes it covers: 330000 (a province)
    covers 33xxxx, 330100 (a city) covers 3301xx, 330102 (a district) itself."""
    scope = region.rstrip("0")
    # a city code keeps its pair of digits (330100 -> 3301, not 3301 -> 33 via 330000)
    return scope + "0" * (len(scope) % 2)
