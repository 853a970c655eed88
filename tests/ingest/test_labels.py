from __future__ import annotations

from collections import Counter

import pytest

from radstream.ingest.errors import RejectError
from radstream.ingest.labels import REGIONS, class_names_for, irma_region, load_irma_codes
from tests.conftest import SHARED_DATA

IRMA_DIR = SHARED_DATA / "irma"
needs_irma = pytest.mark.skipif(
    not IRMA_DIR.is_dir(), reason=f"real IRMA code lists not found at {IRMA_DIR} (../shared/data is absent)"
)


def test_regions_are_the_nine_irma_regions():
    assert list(REGIONS) == list(range(1, 10))
    assert REGIONS[1] == "whole_body" and REGIONS[5] == "chest" and REGIONS[9] == "lower_extremity"


@pytest.mark.parametrize(
    ("code", "region"),
    [
        ("1121-120-200-700", "cranium"),
        ("1121-127-700-500", "abdomen"),
        ("1123-211-500-000", "chest"),
        ("1121-115-110-400", "whole_body"),
        ("  1121-120-942-700\n", "lower_extremity"),
        ("1121-12f-6a0-7b0", "breast"),
    ],
)
def test_irma_region_reads_the_first_anatomical_digit(code, region):
    assert irma_region(code) == region


@pytest.mark.parametrize(
    "code",
    [
        "",
        "\\N",
        "1121-120-200",
        "1121-120-200-700-1",
        "1121_120_200_700",
        "11211-20-200-700",
        "1121-120-2X0-700",
    ],
)
def test_irma_region_rejects_malformed_codes(code):
    with pytest.raises(RejectError, match=r"^unknown IRMA code .*TTTT-DDD-AAA-BBB"):
        irma_region(code)


@pytest.mark.parametrize("code", ["1121-120-000-700", "1121-120-a00-700"])
def test_irma_region_rejects_unknown_regions(code):
    with pytest.raises(RejectError, match=rf"^unknown IRMA code '{code}': anatomical region"):
        irma_region(code)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("1121-102-200-700", "directional axis '102' refines an unspecified level"),
        ("1021-120-200-700", "technical axis '1021' refines an unspecified level"),
        ("1121-120-205-700", "anatomical axis '205' refines an unspecified level"),
        ("1121-120-200-070", "biological axis '070' refines an unspecified level"),
        ("a121-120-200-700", "technical axis 'a121' starts with a letter"),
        ("1121-z20-200-700", "directional axis 'z20' starts with a letter"),
        ("1121-120-200-b00", "biological axis 'b00' starts with a letter"),
    ],
)
def test_irma_region_rejects_malformed_other_axes(code, reason):
    """The region digit alone is not enough: a code whose other axes cannot exist is a typo, not a label."""
    with pytest.raises(RejectError, match=rf"^unknown IRMA code '{code}': {reason}$"):
        irma_region(code)


@pytest.mark.parametrize("code", ["0000-000-500-000", "1121-4a0-91b-000", "1123-211-500-000"])
def test_irma_region_accepts_unspecified_and_lettered_levels(code):
    assert irma_region(code) == {"5": "chest", "9": "lower_extremity"}[code[9]]


def test_irma_region_rejects_non_strings():
    with pytest.raises(RejectError, match="unknown IRMA code None"):
        irma_region(None)  # type: ignore[arg-type]


def test_load_irma_codes_skips_missing_values(tmp_path):
    csv = tmp_path / "codes.csv"
    csv.write_text(
        "image_id;irma_code;05_class\n"
        "1877;1121-117-720-452;52\n"
        "1878;\\N;\\N\n"
        "\\N;1121-120-200-700;3\n"
        "1879;1121-117-720-452;\\N\n"
        "1880;1121-127-700-500;51"  # the real lists end without a newline
    )
    assert load_irma_codes(csv) == {
        "1877": "1121-117-720-452",
        "1879": "1121-117-720-452",
        "1880": "1121-127-700-500",
    }


def test_load_irma_codes_two_column_list(tmp_path):
    csv = tmp_path / "irma_codes.csv"
    csv.write_text("image_id;irma_code\nP000001_0;1121-120-200-700\n")
    assert load_irma_codes(str(csv)) == {"P000001_0": "1121-120-200-700"}


def test_load_irma_codes_errors_name_the_file(tmp_path):
    no_column = tmp_path / "wrong.csv"
    no_column.write_text("image;code\n1;1121-120-200-700\n")
    with pytest.raises(
        ValueError, match=r"wrong\.csv: IRMA code list lacks column\(s\) \['image_id', 'irma_code'\]"
    ):
        load_irma_codes(no_column)
    with pytest.raises(ValueError, match=r"absent\.csv: cannot read IRMA code list"):
        load_irma_codes(tmp_path / "absent.csv")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"image_id;irma_code\n\xff\xfe\x00\x81;x\n")
    with pytest.raises(ValueError, match=r"binary\.csv: cannot read IRMA code list"):
        load_irma_codes(binary)


def test_load_irma_codes_rejects_conflicting_duplicates(tmp_path):
    csv = tmp_path / "dup.csv"
    csv.write_text(
        "image_id;irma_code\n1;1121-120-200-700\n1;1121-120-200-700\n2;1121-120-200-700\n2;1121-120-500-700\n"
    )
    with pytest.raises(ValueError, match=r"dup\.csv:5: image '2' has two codes"):
        load_irma_codes(csv)


def test_class_names_for_irma_follow_the_region_digits():
    labels = ["pelvis", None, "chest", "cranium", "whole_body", "chest", "lower_extremity"]
    assert class_names_for("irma", labels) == ["whole_body", "cranium", "chest", "pelvis", "lower_extremity"]
    assert class_names_for("irma", labels, drop=("whole_body",)) == [
        "cranium",
        "chest",
        "pelvis",
        "lower_extremity",
    ]


def test_class_names_for_other_sources_are_sorted():
    labels = ["dog", "cat", None, "bird", "cat"]
    assert class_names_for("folder", labels) == ["bird", "cat", "dog"]
    assert class_names_for("csv", labels, drop=["cat"]) == ["bird", "dog"]
    assert class_names_for("none", [None, None]) == []


def test_class_names_for_irma_refuses_non_regions():
    with pytest.raises(ValueError, match=r"\['knee'\] are not IRMA regions"):
        class_names_for("irma", ["chest", "knee"])


@needs_irma
def test_real_training_list():
    codes = load_irma_codes(IRMA_DIR / "train_codes_02.csv")
    assert len(codes) == 12_677
    assert len(set(codes.values())) == 193
    regions = Counter(irma_region(code) for code in codes.values())
    assert regions == {
        "whole_body": 3,
        "cranium": 1246,
        "spine": 1475,
        "upper_extremity": 2041,
        "chest": 4829,
        "breast": 339,
        "abdomen": 307,
        "pelvis": 284,
        "lower_extremity": 2153,
    }
    names = class_names_for("irma", [irma_region(code) for code in codes.values()], drop=("whole_body",))
    assert names == [
        "cranium",
        "spine",
        "upper_extremity",
        "chest",
        "breast",
        "abdomen",
        "pelvis",
        "lower_extremity",
    ]


@needs_irma
def test_real_test_list_codes_are_all_valid():
    codes = load_irma_codes(IRMA_DIR / "test_codes_03.csv")
    assert len(codes) == 1733
    assert {irma_region(code) for code in codes.values()} <= set(REGIONS.values())
