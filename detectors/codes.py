"""Normalise and classify a scanned code: the key every other detector uses.

A box may be scanned many ways - with a symbology identifier, with or without GS separators, in
human-readable `(01)...(21)...` form, with its AIs in any order, as a GS1 Digital Link URI, with
full-width digits from a Chinese input method, with surrounding spaces or case flipped by caps
lock. All spellings of one box map to one key:

- Chinese 20-digit code (NMPAB/T 1002-2019): the 20 digits, starting with 8 (the national
  platform's codes; any other 20 digits are not a trace code). No check digit is public, so none
  is checked; offline validity is format + known prefix + prefix of the billed product.
- GS1 element string: `01` + GTIN-14 + `21` + serial (serial upper-cased: case flips are a scanner
  fault, and GS1 serials differing only by case do not occur in practice). GTIN + serial is what
  identifies one pack in GS1; batch and expiry are kept as facts, not as key.

GS1 parsing and the GTIN check digit come from `biip`; this module only cleans the text around it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from biip import ParseError
from biip.checksums import gs1_standard_check_digit
from biip.gs1_application_identifiers import GS1ApplicationIdentifier
from biip.gs1_digital_link_uris import GS1DigitalLinkURI
from biip.gs1_element_strings import GS1ElementStrings
from biip.gs1_messages import GS1Message
from biip.gtin import Gtin


class CodeKind(StrEnum):
    CN20 = "cn20"
    GS1 = "gs1"
    COMMODITY_BARCODE = "ean13"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class ScannedCode:
    raw: str
    kind: CodeKind
    key: str | None = None  # normalised code; None unless kind is CN20 or GS1
    prefix: str | None = None  # 7-digit identification code of a CN20 code
    gtin: str | None = None  # GTIN-14 of a GS1 code (or the EAN-13 scanned by mistake)
    expiry: date | None = None
    batch: str | None = None
    serial: str | None = None
    error: str | None = None  # why an INVALID scan is invalid

    @property
    def well_formed(self) -> bool:
        return self.key is not None


# A pack's GS1 string fits the 100-character NHSA field with room to spare: anything much longer
# is garbage (or an attack), refused before it costs regex, biip or cache memory.
_MAX_LEN = 512
# Only scans of a plausible length are cached, so the cache's memory stays small however long
# the strings it is fed; longer ones are rare enough to classify each time.
_CACHED_LEN = 128

_SYMBOLOGY_ID = re.compile(r"^\][A-Za-z][0-9A-Za-z]")
_GS_SPELLINGS = re.compile(r"<GS>|\{GS\}|\^\]|\\x1[dD]", re.IGNORECASE)
_WHITESPACE = re.compile(r"[^\S\x1d]+")  # \s matches GS (0x1D) too: keep it
# A French (AZERTY) keyboard layout turns the digit row into these when a scanner emulates a
# US keyboard: a known scan fault. It turns every digit, so it is only repaired when the whole
# text is made of them: with a digit left, a `-` or `(` is part of a GS1 serial.
_AZERTY_DIGITS = str.maketrans("&é\"'(-è_çà", "1234567890")
_AZERTY_CHARS = frozenset("&é\"'(-è_çà")
_GS = "\x1d"
_SSCC_ERROR = "SSCC (00) of a logistics unit, not a box code"
# Caps lock may upper-case the scheme; the rest of a URI must reach biip untouched.
_URI_SCHEME = re.compile(r"https?://", re.IGNORECASE)


def _clean(raw: str) -> str:
    # NFKC folds full-width digits/letters/parentheses (IME input) to ASCII.
    text = unicodedata.normalize("NFKC", raw) if not raw.isascii() else raw
    text = _GS_SPELLINGS.sub(_GS, text)
    text = _WHITESPACE.sub("", text)  # also removes spaces printed between digit groups
    text = _SYMBOLOGY_ID.sub("", text)
    if text and set(text) <= _AZERTY_CHARS:
        text = text.translate(_AZERTY_DIGITS)
    return text.strip(_GS)


def _ean13_ok(digits: str) -> bool:
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(digits[:12]))
    return (10 - total % 10) % 10 == int(digits[12])


def _is_cn20(text: str) -> bool:
    return len(text) == 20 and text[0] == "8" and text.isascii() and text.isdigit()


def classify(raw: str | bytes) -> ScannedCode:
    """Never raises: anything unusable comes back as CodeKind.INVALID with the reason."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    # Defensive: callers pass validated strings, and the cache below needs a hashable key.
    if not isinstance(raw, str):
        return ScannedCode(str(raw), CodeKind.INVALID, error="not a string")
    if len(raw) > _MAX_LEN:
        return ScannedCode(raw, CodeKind.INVALID, error=f"longer than {_MAX_LEN} characters")
    if len(raw) > _CACHED_LEN:
        return _classify(raw)
    return _classify_cached(raw)


def _classify(raw: str) -> ScannedCode:
    # Fast path: a clean scan of a Chinese code, the overwhelming majority.
    if _is_cn20(raw):
        return ScannedCode(raw, CodeKind.CN20, key=raw, prefix=raw[:7])
    uri = _SYMBOLOGY_ID.sub("", raw.strip())
    if _URI_SCHEME.match(uri):
        return _classify_uri(raw, uri)
    text = _clean(raw)
    if not text:
        return ScannedCode(raw, CodeKind.INVALID, error="empty scan")
    if len(text) > _MAX_LEN:  # NFKC may lengthen a text: one character can become 18
        return ScannedCode(raw, CodeKind.INVALID, error=f"longer than {_MAX_LEN} characters")
    if text.isascii() and text.isdigit():
        return _classify_digits(raw, text)
    if text.startswith("(") or _GS in text or _starts_with_ai(text):
        gs1 = _classify_gs1(raw, text)
        if gs1 is not None:
            return gs1
    return ScannedCode(raw, CodeKind.INVALID, error="neither a 20-digit nor a GS1 code")


# A box is scanned several times in its life (receipt, sale, settlement, retries): GS1 parsing is
# the costliest step of ingest, and ScannedCode is immutable, so share it.
_classify_cached = functools.lru_cache(maxsize=1 << 16)(_classify)


def _classify_digits(raw: str, text: str) -> ScannedCode:
    if _is_cn20(text):
        return ScannedCode(raw, CodeKind.CN20, key=text, prefix=text[:7])
    if len(text) == 13 and _ean13_ok(text):
        return ScannedCode(raw, CodeKind.COMMODITY_BARCODE, gtin=text.zfill(14))
    # A GS1 string needs no GS when its only variable field, the serial, is last: with a numeric
    # serial it is all digits, of any length, 20 included.
    # Other digits that start like a pack are told what is wrong with them as GS1; for the rest,
    # and for 20 digits (a Chinese code mistyped, more likely), their length says more.
    gs1 = _classify_gs1(raw, text) if _starts_with_ai(text) else None
    if gs1 is not None and (gs1.well_formed or (len(text) != 20 and text[:2] in ("01", "21"))):
        return gs1
    if len(text) == 20 and text.startswith("00"):
        return ScannedCode(raw, CodeKind.INVALID, error=_SSCC_ERROR)
    if len(text) == 20:
        return ScannedCode(
            raw, CodeKind.INVALID, error="20 digits not starting with 8: not a Chinese trace code"
        )
    return ScannedCode(raw, CodeKind.INVALID, error=f"{len(text)} digits, expected 20")


def _starts_with_ai(text: str) -> bool:
    try:
        GS1ApplicationIdentifier.extract(text)
    except ParseError:
        return False
    return True


def _classify_uri(raw: str, uri: str) -> ScannedCode:
    try:
        link = GS1DigitalLinkURI.parse(uri)
    except Exception as exc:  # biip raises ParseError; urllib raises ValueError on odd hosts
        return ScannedCode(raw, CodeKind.INVALID, error=f"bad GS1 Digital Link URI: {exc}")
    return _from_element_strings(raw, link.element_strings)


# The common GS1 spellings of a pack - GTIN and serial only, alphanumeric serial, machine or
# HRI form - whose full GS1 parse (biip) was the costliest step of ingest. Anything else, and
# any GTIN whose check digit fails (for biip's error text), goes through biip.
_GTIN_SERIAL = re.compile(r"01(\d{14})21([0-9A-Za-z]{1,20})")
_GTIN_SERIAL_HRI = re.compile(r"\(01\)(\d{14})\(21\)([0-9A-Za-z]{1,20})")


def _classify_gs1(raw: str, text: str) -> ScannedCode | None:
    """None when the text is not GS1 at all (so the caller reports the generic reason)."""
    match = _GTIN_SERIAL.fullmatch(text) or _GTIN_SERIAL_HRI.fullmatch(text)
    if match is not None:
        gtin, serial = match.groups()
        if gs1_standard_check_digit(gtin[:-1]) == int(gtin[-1]):
            serial = serial.upper()
            return ScannedCode(
                raw, CodeKind.GS1, key=f"01{gtin}21{serial}", gtin=gtin, serial=serial
            )
    return _parse_gs1(raw, text)


def _parse_gs1(raw: str, text: str) -> ScannedCode | None:
    try:
        if text.startswith("("):
            message = GS1Message.parse_hri(text.replace(_GS, ""))
        else:
            message = GS1Message.parse(text)
    except Exception as exc:  # biip raises ParseError and, on odd input, ValueError
        # Digits alone are GS1 only when they start like a pack; otherwise the caller's digit
        # count says more.
        if not text.isdigit() or (len(text) >= 16 and text[:2] in ("01", "21")):
            return ScannedCode(raw, CodeKind.INVALID, error=f"bad GS1 string: {exc}")
        return None
    return _from_element_strings(raw, message.element_strings)


def _from_element_strings(raw: str, element_strings: GS1ElementStrings) -> ScannedCode:
    fields = {es.ai.ai: es for es in element_strings}
    gtin_es = fields.get("01")
    if gtin_es is None:
        if "00" in fields:  # a case or pallet label scanned at the counter
            return ScannedCode(raw, CodeKind.INVALID, error=_SSCC_ERROR)
        return ScannedCode(raw, CodeKind.INVALID, error="GS1 string without GTIN (01)")
    if gtin_es.gtin_error:
        return ScannedCode(raw, CodeKind.INVALID, gtin=gtin_es.value, error=gtin_es.gtin_error)
    serial_es = fields.get("21")
    if serial_es is None or not serial_es.value:
        return ScannedCode(
            raw, CodeKind.INVALID, gtin=gtin_es.value, error="GS1 string without serial (21)"
        )
    gtin = gtin_es.gtin.as_gtin_14() if gtin_es.gtin else Gtin.parse(gtin_es.value).as_gtin_14()
    serial = serial_es.value.upper()
    expiry_es = fields.get("17")
    batch_es = fields.get("10")
    return ScannedCode(
        raw,
        CodeKind.GS1,
        key=f"01{gtin}21{serial}",
        gtin=gtin,
        expiry=expiry_es.date if expiry_es is not None else None,
        batch=batch_es.value if batch_es is not None else None,
        serial=serial,
    )
