"""The normaliser/classifier: every scanner quirk, and properties over arbitrary input."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from detectors.codes import CodeKind, _classify_gs1, _parse_gs1, classify

GS1_KEY = "010691234567890221XYZ123"
CN = "81234567890123456789"


@pytest.mark.parametrize(
    ("raw", "kind", "key"),
    [
        (CN, CodeKind.CN20, CN),
        (f"  {CN}\t", CodeKind.CN20, CN),  # surrounding spaces
        ("8123 4567 8901 2345 6789", CodeKind.CN20, CN),  # printed digit groups
        ("８１２３４５６７８９０１２３４５６７８９", CodeKind.CN20, CN),  # full-width (IME)
        ("&é\"'(-è_çà&é\"'(-è_çà", CodeKind.CN20, "12345678901234567890"),  # AZERTY swap
        ("]d2010691234567890217251231105ABC\x1d21XYZ123", CodeKind.GS1, GS1_KEY),
        ("]C1010691234567890217251231105ABC\x1d21XYZ123", CodeKind.GS1, GS1_KEY),
        ("]Q3010691234567890217251231105ABC\x1d21XYZ123", CodeKind.GS1, GS1_KEY),
        ("010691234567890217251231105ABC<GS>21XYZ123", CodeKind.GS1, GS1_KEY),
        ("(01)06912345678902(17)251231(10)5ABC(21)XYZ123", CodeKind.GS1, GS1_KEY),
        ("（01）06912345678902（17）251231（10）5ABC（21）XYZ123", CodeKind.GS1, GS1_KEY),
        ("010691234567890217251231105ABC\x1d21xyz123", CodeKind.GS1, GS1_KEY),  # caps lock
        ("0106912345678902172512312 1XYZ123", CodeKind.GS1, GS1_KEY),  # stray space, no batch
        # serial last, so a lost GS before it is harmless
        ("01069123456789021725123121XYZ123", CodeKind.GS1, GS1_KEY),
        ("0106912345678902172501002 1XYZ123", CodeKind.GS1, GS1_KEY),  # day 00 = month end
    ],
)
def test_spellings_of_one_box_share_a_key(raw: str, kind: CodeKind, key: str) -> None:
    scan = classify(raw)
    assert scan.kind is kind, scan
    assert scan.key == key
    assert scan.raw == raw  # the scan as sent stays the evidence


@pytest.mark.parametrize(
    ("raw", "kind", "error_part"),
    [
        ("6912345678902", CodeKind.COMMODITY_BARCODE, None),  # EAN-13 instead of trace code
        ("6912345678903", CodeKind.INVALID, "13 digits"),  # EAN-13 with a bad check digit
        ("8123456789012345678", CodeKind.INVALID, "19 digits"),
        ("812345678901234567890", CodeKind.INVALID, "21 digits"),
        ("0106912345678903172512311 0AB\x1d21X", CodeKind.INVALID, "check digit"),
        ("010691234567890217250230\x1d21X", CodeKind.INVALID, "date"),  # 30 February
        ("0106912345678902172512311", CodeKind.INVALID, "bad GS1"),
        ("0106912345678902", CodeKind.INVALID, "serial"),
        ("hello", CodeKind.INVALID, "neither"),
        ("", CodeKind.INVALID, "empty"),
        ("   ", CodeKind.INVALID, "empty"),
    ],
)
def test_what_is_not_a_trace_code(raw: str, kind: CodeKind, error_part: str | None) -> None:
    scan = classify(raw)
    assert scan.kind is kind, scan
    assert scan.key is None and not scan.well_formed
    if error_part is not None:
        assert scan.error is not None and error_part in scan.error


def test_gs1_facts_are_kept() -> None:
    scan = classify("(01)06912345678902(17)250200(10)LOT7(21)S1")
    assert scan.gtin == "06912345678902"
    assert scan.batch == "LOT7"
    assert scan.serial == "S1"
    assert scan.expiry is not None and (scan.expiry.month, scan.expiry.day) == (2, 28)


def test_cn20_prefix() -> None:
    assert classify(CN).prefix == "8123456"


@given(st.text(max_size=120))
def test_never_raises_on_text(raw: str) -> None:
    scan = classify(raw)
    assert scan.kind in CodeKind
    assert (scan.key is None) == (scan.kind not in (CodeKind.CN20, CodeKind.GS1))


@given(st.binary(max_size=120))
def test_never_raises_on_bytes(raw: bytes) -> None:
    assert classify(raw).kind in CodeKind


@given(st.text(max_size=60))
def test_normalising_a_key_gives_the_key(raw: str) -> None:
    key = classify(raw).key
    if key is not None:
        assert classify(key).key == key


_serial = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=1, max_size=20)
_gtin_payload = st.text(alphabet="0123456789", min_size=13, max_size=13)


def _gtin14(payload: str) -> str:
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(payload))
    return payload + str((10 - total % 10) % 10)


@given(_gtin_payload, _serial, st.sampled_from(["]d2", "]C1", "]Q3", ""]))
def test_equivalent_gs1_spellings_map_to_one_key(payload: str, serial: str, sid: str) -> None:
    gtin = _gtin14(payload)
    spellings = [
        f"{sid}01{gtin}17261231\x1d21{serial}",
        f"{sid}01{gtin}21{serial}\x1d17261231",
        f"(01){gtin}(17)261231(21){serial}",
        f"  01{gtin}21{serial.lower()}  ",
        f"01{gtin}21{serial}".translate(str.maketrans("0123456789", "０１２３４５６７８９")),
    ]
    keys = {classify(s).key for s in spellings}
    assert keys == {f"01{gtin}21{serial}"}


@given(
    st.text(alphabet="0123456789", min_size=13, max_size=15),
    st.booleans(),
    st.text(alphabet="aZ09xY(-/", min_size=0, max_size=22),
    st.booleans(),
)
@example("0000000000000", True, "A", False)  # all-zero GTIN
@example("9501101530003", True, "12345678901234567890", True)  # longest serial
@example("9501101530003", True, "123456789012345678901", False)  # one too long
def test_gs1_fast_path_agrees_with_biip(digits: str, valid: bool, serial: str, hri: bool) -> None:
    """GTIN + serial scans skip biip's full parse; whatever they answer, biip answers too."""
    gtin = _gtin14(digits[:13]) if valid and len(digits) >= 13 else digits
    text = f"(01){gtin}(21){serial}" if hri else f"01{gtin}21{serial}"
    assert _classify_gs1(text, text) == _parse_gs1(text, text)
