"""The normaliser/classifier: every scanner quirk, and properties over arbitrary input."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from detectors.codes import CodeKind, _classify_cached, _classify_gs1, _parse_gs1, classify

GS1_KEY = "010691234567890221XYZ123"
CN = "81234567890123456789"


@pytest.mark.parametrize(
    ("raw", "kind", "key"),
    [
        (CN, CodeKind.CN20, CN),
        (f"  {CN}\t", CodeKind.CN20, CN),  # surrounding spaces
        ("8123 4567 8901 2345 6789", CodeKind.CN20, CN),  # printed digit groups
        ("８１２３４５６７８９０１２３４５６７８９", CodeKind.CN20, CN),  # full-width (IME)
        ("_&é\"'(-è_çà&é\"'(-è_ç", CodeKind.CN20, CN),  # AZERTY swap
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
        # GS1 allows any AI order: expiry or batch first
        ("17251231105ABC\x1d010691234567890221XYZ123", CodeKind.GS1, GS1_KEY),
        ("]d217251231105ABC\x1d010691234567890221XYZ123", CodeKind.GS1, GS1_KEY),
        ("]C1105ABC\x1d17251231010691234567890221XYZ123", CodeKind.GS1, GS1_KEY),
        ("17251231105ABC<GS>010691234567890221xyz123", CodeKind.GS1, GS1_KEY),
        ("(17)251231(10)5ABC(01)06912345678902(21)XYZ123", CodeKind.GS1, GS1_KEY),
        ("（17）251231（10）5ABC（01）06912345678902（21）XYZ123", CodeKind.GS1, GS1_KEY),
        ("21XYZ123\x1d105ABC\x1d172512310106912345678902", CodeKind.GS1, GS1_KEY),
        # GS1 Digital Link URIs of the same pack
        ("https://id.gs1.org/01/06912345678902/21/XYZ123?17=251231", CodeKind.GS1, GS1_KEY),
        (
            "  http://example.com/dl/01/06912345678902/10/5ABC/21/xyz123?17=251231 ",
            CodeKind.GS1,
            GS1_KEY,
        ),
        ("HTTPS://ID.GS1.ORG/01/6912345678902/21/XYZ123", CodeKind.GS1, GS1_KEY),  # GTIN-13
        ("]Q1https://id.gs1.org/01/06912345678902/21/XYZ123?10=5ABC", CodeKind.GS1, GS1_KEY),
        # all digits, 20 of them, but a GS1 string with a numeric serial, not a Chinese code
        ("01069123456789022112", CodeKind.GS1, "01069123456789022112"),
        (" " * 492 + CN, CodeKind.CN20, CN),  # 512 characters: long, yet still a scan
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
        ("12345678901234567890", CodeKind.INVALID, "not starting with 8"),
        ("91234567890123456789", CodeKind.INVALID, "not starting with 8"),
        ("00106141412345678908", CodeKind.INVALID, "SSCC"),  # case label of a logistics unit
        ("]C100106141412345678908", CodeKind.INVALID, "SSCC"),
        ("(00)106141412345678908", CodeKind.INVALID, "SSCC"),
        ("https://id.gs1.org/00/106141412345678908", CodeKind.INVALID, "SSCC"),
        ("17251231105ABC", CodeKind.INVALID, "GTIN (01)"),  # other AIs, no pack identity
        ("(17)251231(10)5ABC", CodeKind.INVALID, "GTIN (01)"),
        ("17251231105ABC\x1d0106912345678902", CodeKind.INVALID, "serial (21)"),
        ("17250230105ABC\x1d010691234567890221X", CodeKind.INVALID, "date"),
        ("17251231105ABC\x1d010691234567890321X", CodeKind.INVALID, "check digit"),
        ("https://id.gs1.org/01/06912345678903/21/XYZ123", CodeKind.INVALID, "check digit"),
        ("https://id.gs1.org/01/06912345678902/21/XYZ123?17=250230", CodeKind.INVALID, "date"),
        ("https://id.gs1.org/01/06912345678902", CodeKind.INVALID, "serial (21)"),
        ("https://example.com/hello", CodeKind.INVALID, "Digital Link"),
        ("https://[/01/06912345678902/21/X", CodeKind.INVALID, "Digital Link"),
        (" " * 493 + CN, CodeKind.INVALID, "longer than 512"),
        ("\u3316" * 100, CodeKind.INVALID, "longer than 512"),  # NFKC: 600 letters of 100
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


@pytest.mark.parametrize(
    "raw",
    [
        "1725020010LOT7\x1d010691234567890221S1",
        "(17)250200(10)LOT7(01)06912345678902(21)S1",
        "https://id.gs1.org/01/06912345678902/10/LOT7/21/S1?17=250200",
    ],
)
def test_gs1_facts_are_kept_in_any_order_and_in_uris(raw: str) -> None:
    scan = classify(raw)
    assert (scan.gtin, scan.batch, scan.serial) == ("06912345678902", "LOT7", "S1")
    assert scan.expiry is not None and (scan.expiry.month, scan.expiry.day) == (2, 28)


def test_cn20_prefix() -> None:
    assert classify(CN).prefix == "8123456"


_rng = random.Random(0)
_MB = 1 << 20


@pytest.mark.parametrize(
    "raw",
    [
        "8" * _MB,
        "01" + "9" * (_MB - 2),
        " " * _MB + CN,
        "(01)" * (_MB // 4),
        "https://id.gs1.org/01/06912345678902/21/" + "A" * _MB,
        "".join(chr(_rng.randrange(0x110000)) for _ in range(_MB)),
        "".join(_rng.choice("0123456789()<GS>\x1d ]d2ABCxyz") for _ in range(_MB)),
    ],
    ids=["digits", "gs1-digits", "padded", "hri", "uri", "random-unicode", "random-gs1ish"],
)
def test_a_huge_scan_is_refused_fast_and_not_cached(raw: str) -> None:
    cached = _classify_cached.cache_info().currsize
    for value in (raw, raw.encode("utf-8", errors="surrogatepass")):
        start = time.perf_counter()
        scan = classify(value)
        elapsed = time.perf_counter() - start
        assert scan.kind is CodeKind.INVALID
        assert scan.error is not None and "longer than 512" in scan.error
        assert elapsed < 0.05, elapsed
    assert _classify_cached.cache_info().currsize == cached


def test_a_long_scan_is_classified_but_not_cached() -> None:
    cached = _classify_cached.cache_info().currsize
    assert classify("\x1d" * 200 + CN + " " * 200).key == CN
    assert _classify_cached.cache_info().currsize == cached


@given(st.text(st.characters(exclude_categories=()), max_size=120))  # lone surrogates too
@example("\ud800")
@example("\x00" * 20)
@example("\x1d" * 5)
@example("]d2")
@example("(")
@example("http://\ud800/01/06912345678902/21/A")
@example("https://[")
@example("17" + "\x00" * 40)
@example("\u3316" * 85)  # NFKC lengthens it to 510 characters
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


@given(
    st.sampled_from(
        ["", "0106912345678902", "(01)06912345678902(21)", "https://x/01/06912345678902/21/"]
    ),
    st.text(alphabet="0123456789()\x1d217aZ-/& ", max_size=40),
)
def test_normalising_a_gs1_ish_key_gives_the_key(head: str, tail: str) -> None:
    key = classify(head + tail).key
    if key is not None:
        assert classify(key).key == key


@pytest.mark.parametrize(
    "raw",
    [
        "010691234567890221123-456",
        "(01)06912345678902(21)123-456",
        "https://id.gs1.org/01/06912345678902/21/123-456",
    ],
)
def test_a_serial_with_digits_and_a_hyphen_is_not_an_azerty_swap(raw: str) -> None:
    assert classify(raw).key == "010691234567890221123-456"


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
    _gtin_payload,
    _serial,
    st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=1, max_size=20),
    st.permutations(["01", "17", "10", "21"]),
    st.sampled_from(["]d2", ""]),
)
def test_any_ai_order_and_digital_link_map_to_one_key(
    payload: str, serial: str, batch: str, order: list[str], sid: str
) -> None:
    gtin = _gtin14(payload)
    values = {"01": gtin, "17": "261231", "10": batch, "21": serial}
    # A variable-length field needs a GS after it unless it ends the message.
    machine = "".join(
        f"{ai}{values[ai]}" + ("\x1d" if ai in ("10", "21") and i < 3 else "")
        for i, ai in enumerate(order)
    )
    spellings = [
        sid + machine,
        machine.replace("\x1d", "<GS>"),
        "".join(f"({ai}){values[ai]}" for ai in order),
        f"https://id.gs1.org/01/{gtin}/10/{batch}/21/{serial}?17=261231",
        f" http://example.com/a/b/01/{gtin}/21/{serial.lower()} ",
    ]
    scans = [classify(s) for s in spellings]
    assert {scan.key for scan in scans} == {f"01{gtin}21{serial}"}, scans


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
