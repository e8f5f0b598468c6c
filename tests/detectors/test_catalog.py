"""The catalog loader refuses a file whole, naming file and line, when a code could map to
two products or an entry cannot be right."""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.catalog import ReferenceDataError, load_catalog

GOOD_GTIN = "06912345678902"  # check digit 2


def write(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_good_catalog_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'{{"product": "A", "prefixes": ["8100001"], "gtins": ["{GOOD_GTIN}"], "pack_size": 10}}',
        '{"product": "B", "prefixes": ["8100002"], "gtins": ["4006381333931"]}',
    )
    catalog = load_catalog(path)
    assert len(catalog) == 2 and catalog.by_gtin[GOOD_GTIN].product == "A"


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        ([], "no products"),
        (["", "  "], "no products"),
        (['{"product": "A"}', '{"product": "B"}', '{"product": "A"}'], "line 3: product 'A'"),
        (
            [
                '{"product": "A", "prefixes": ["8100001"]}',
                '{"product": "B", "prefixes": ["8100001"]}',
            ],
            "line 2: prefix 8100001 of 'B' belongs to 'A' already",
        ),
        (
            [
                f'{{"product": "A", "gtins": ["{GOOD_GTIN}"]}}',
                '{"product": "B", "gtins": ["6912345678902"]}',
            ],
            "line 2: GTIN 06912345678902 of 'B' belongs to 'A' already",
        ),
        (
            ['{"product": "A", "gtins": ["06912345678903"]}'],
            "line 1: GTIN 06912345678903 has a bad check digit",
        ),
    ],
)
def test_a_bad_catalog_is_refused_naming_the_line(
    tmp_path: Path, lines: list[str], said: str
) -> None:
    path = write(tmp_path, *lines)
    with pytest.raises(ReferenceDataError) as caught:
        load_catalog(path)
    assert path in str(caught.value) and said in str(caught.value)
