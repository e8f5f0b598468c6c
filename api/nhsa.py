"""NHSA field names (the 3501-3507 and 2207 interfaces) to the contract's event format.

HIS and POS vendors already send these interfaces' JSON; `POST /v1/events` and the check accept
an object in that form - recognised by its `infno` (the interface number) - and map it here,
before the contract's parser sees it. One NHSA record is one line of one event.

| NHSA field | contract field |
|---|---|
| `infno` | `type`: 3501 stock_count, 3502 stock_change, 3503 purchase, 3504 purchase_return, 3505 sale, 3506 sale_return, 3507 void, 2207 settlement |
| `fixmedins_code` | `institution` |
| `fixmedins_bchno` (else `event_id`) | `event_id` |
| `med_list_codg` | line `product` (or `product` of a stock event) |
| `drug_trac_codg` (a string, several joined by `,`) or `drugtracinfo` / `drug_trac_info` (a list of `{"drug_trac_codg": ...}`) | line `codes` (or `codes` of a stock change) |
| `trdn_flag` (`1`/`0`) | line `split` |
| `sel_retn_cnt`, else `purc_invo_cnt`, `cnt`, `invcnt` | `quantity` |
| `sel_retn_time`, else `purc_retn_time`, `inv_chg_time`, `inv_time`, `setl_time` | `occurred_at` (without an offset: China Standard Time, +08:00) |
| `setl_id` | `settlement_id` |
| `manu_lotnum` | line `batch` |
| `psn_no` | `patient` |
| `inv_chg_type` (3502) | `reason`: 101 transfer_in, 102 transfer_out, 103 loss, 104 damage, 105 expired, else other |
| `retn_trgt_bchno` (3506) | `original_event_id`; 3507's `voided_bchno` -> `voided_event_id` |

Fields the contract already names (e.g. `unit`, `line_no`) pass through; anything else is kept
as NHSA sent it and ignored by the detectors, as the contract says of unknown fields.
"""

from __future__ import annotations

from typing import Any

INFNO_TYPES = {
    "3501": "stock_count",
    "3502": "stock_change",
    "3503": "purchase",
    "3504": "purchase_return",
    "3505": "sale",
    "3506": "sale_return",
    "3507": "void",
    "2207": "settlement",
}
INV_CHG_REASONS = {
    "101": "transfer_in",
    "102": "transfer_out",
    "103": "loss",
    "104": "damage",
    "105": "expired",
}
_QUANTITY = ("sel_retn_cnt", "purc_invo_cnt", "cnt", "invcnt")
_TIME = ("sel_retn_time", "purc_retn_time", "inv_chg_time", "inv_time", "setl_time")


def is_nhsa(obj: Any) -> bool:
    return isinstance(obj, dict) and "infno" in obj


def _first(obj: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if obj.get(name) is not None:
            return obj[name]
    return None


def _time(value: Any) -> Any:
    """NHSA times are local ('2026-11-20 14:02:00'): ISO-8601 with China's offset."""
    if not isinstance(value, str):
        return value
    text = value.strip().replace(" ", "T", 1)
    has_offset = text.endswith("Z") or "+" in text[10:] or "-" in text[10:]
    return text if has_offset else text + "+08:00"


def _codes(obj: dict[str, Any]) -> list[Any] | None:
    listed = obj.get("drugtracinfo", obj.get("drug_trac_info"))
    if isinstance(listed, list):
        return [i.get("drug_trac_codg") if isinstance(i, dict) else i for i in listed]
    single = obj.get("drug_trac_codg")
    if isinstance(single, str):
        return [c.strip() for c in single.split(",") if c.strip()]
    if single is not None:
        return [single]
    return None


def _number(value: Any) -> Any:
    """NHSA sends counts as strings as often as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def to_contract(obj: dict[str, Any]) -> dict[str, Any]:
    """The contract event an NHSA record describes. Values are moved, not checked: the
    contract's parser then refuses what is wrong, with the contract's reasons."""
    infno = str(obj.get("infno"))
    etype = INFNO_TYPES.get(infno, f"nhsa {infno}")
    mapped = {
        "nhsa": obj,
        "type": etype,
        "event_id": obj.get("fixmedins_bchno", obj.get("event_id")),
        "institution": obj.get("fixmedins_code", obj.get("institution")),
        "occurred_at": _time(_first(obj, _TIME) or obj.get("occurred_at")),
    }
    quantity = _number(_first(obj, _QUANTITY))
    if quantity is None:
        quantity = obj.get("quantity")
    codes = _codes(obj)
    if etype in ("stock_count", "stock_change"):
        mapped.update(product=obj.get("med_list_codg", obj.get("product")), quantity=quantity)
        mapped["unit"] = obj.get("unit", "pack")
        if etype == "stock_change":
            reason = obj.get("reason")
            if reason is None:
                reason = INV_CHG_REASONS.get(str(obj.get("inv_chg_type")), "other")
            mapped["reason"] = reason
            if codes is not None:
                mapped["codes"] = codes
        return mapped
    if etype == "void":
        mapped["voided_event_id"] = obj.get("voided_bchno", obj.get("voided_event_id"))
        return mapped
    line: dict[str, Any] = {
        "line_no": obj.get("line_no", 1),
        "product": obj.get("med_list_codg", obj.get("product")),
        "quantity": quantity,
        "unit": obj.get("unit", "pack"),
        "split": str(obj.get("trdn_flag", "0")) == "1",
        "codes": codes or [],
    }
    if obj.get("manu_lotnum") is not None:
        line["batch"] = obj["manu_lotnum"]
    mapped["lines"] = [line]
    if obj.get("setl_id") is not None:
        mapped["settlement_id"] = obj["setl_id"]
    if etype == "settlement" and obj.get("psn_no") is not None:
        mapped["patient"] = obj["psn_no"]
    if etype == "sale_return" and obj.get("retn_trgt_bchno") is not None:
        mapped["original_event_id"] = obj["retn_trgt_bchno"]
    return mapped
