"""Bad sections: the user's list (parse_sections, format_sections) and the detector that proposes suspects."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_emdiffuse.core.normalize import InputError
from napari_emdiffuse.core.sections import format_sections, parse_sections, suspect_sections


@pytest.mark.parametrize("text, expected", [
    ("12,40-41", (12, 40, 41)),
    (" 40 - 41 , 12 ", (12, 40, 41)),
    ("5, 3-6, 4", (3, 4, 5, 6)),  # overlaps and repeats merge
    ("7\u20139", (7, 8, 9)),  # an en dash, as typed by some keyboards
    ("1", (1,)),
    ("48", (48,)),
    ("", ()),
    ("   ", ()),
])
def test_parse_sections_reads_lists_and_ranges(text, expected):
    assert parse_sections(text, 50) == expected


@pytest.mark.parametrize("text, words", [
    ("12;13", "Cannot read '12;13'"),
    ("1,,2", "Cannot read an empty item"),
    ("3,", "Cannot read an empty item"),
    ("a", "Cannot read 'a'"),
    ("3-", "Cannot read '3-'"),
    ("1.5", "Cannot read '1.5'"),
    ("2-3-4", "Cannot read '2-3-4'"),
    ("-3", "'-3' is negative"),
    ("2--3", "'2--3' is negative"),
    ("9-4", "'9-4' of bad sections runs backwards; write it as 4-9"),
    ("50", "Bad section 50 is outside the stack, whose 50 sections are 0 to 49"),
    ("45-52", "Bad section 52 is outside"),
    ("0", "Section 0 cannot be regenerated: it has no good neighbour before it"),
    ("0-2", "Section 0 cannot be regenerated"),
    ("49", "Section 49 cannot be regenerated: it has no good neighbour after it"),
    ("0-49", "Every section is marked bad"),
    ("10-13", "The 4 consecutive bad sections 10-13 are too many to regenerate; at most 3 in a row can be"),
    ("10-11, 12", "The 3 consecutive bad sections 10-12"),
])
def test_parse_sections_refuses_with_one_sentence(text, words):
    with pytest.raises(InputError) as error:
        parse_sections(text, 50, max_run=3 if text.startswith("10-13") else 2)
    assert words in str(error.value)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


def test_parse_sections_without_a_run_limit_takes_long_runs():
    assert parse_sections("1-48", 50) == tuple(range(1, 49))


@pytest.mark.parametrize("indices, text", [((12, 40, 41), "12, 40-41"), ((3, 1, 2, 2, 7), "1-3, 7"), ((), "")])
def test_format_sections_is_compact_and_parse_reads_it_back(indices, text):
    assert format_sections(indices) == text
    assert parse_sections(text, 50) == tuple(sorted(set(indices)))


# --- the detector, on a smooth random texture whose sections change gradually, like serial sections ---

def texture(z=12, size=160, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=(z * 3, size, size)), (1.5, 2.5, 2.5))[::3]  # sections 3 apart
    field += 0.15 * field.std() * rng.normal(size=field.shape)  # acquisition noise
    field = (field - field.mean()) / field.std()
    return np.clip(np.rint(120 + 35 * field), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clean():
    return texture()


def only(suspects, index):
    assert [s.index for s in suspects] == [index], [(s.index, s.reason) for s in suspects]
    return suspects[0]


def test_a_clean_stack_has_no_suspects(clean):
    assert suspect_sections(clean) == []
    for seed in (1, 2):  # and other clean stacks, of other sizes
        assert suspect_sections(texture(z=9, size=200, seed=seed)) == []


def test_a_section_replaced_by_noise_correlates_poorly(clean):
    damaged = clean.copy()
    damaged[5] = np.random.default_rng(3).integers(60, 180, damaged[5].shape)
    suspect = only(suspect_sections(damaged), 5)
    assert suspect.reason.startswith("correlates poorly with both neighbours (")
    assert suspect.region is None and suspect.score > 1


def test_two_sections_from_elsewhere_are_both_proposed(clean):
    damaged = clean.copy()
    damaged[5:7] = texture(z=2, seed=9)  # resemble each other, not the sections around them
    suspects = suspect_sections(damaged)
    assert [s.index for s in suspects] == [5, 6]
    assert all("sections 5-6 correlate poorly" in s.reason for s in suspects)
    assert suspect_sections(damaged, max_run=1) == []  # a run too long to regenerate is not proposed


def test_a_blank_half_is_proposed_with_its_region(clean):
    damaged = clean.copy()
    damaged[4, :, 80:] = 0
    suspect = only(suspect_sections(damaged), 4)
    assert suspect.reason == "50% blank"
    assert suspect.region.shape == clean.shape[1:]
    assert suspect.region[:, 80:].all() and suspect.region[:, :76].mean() < 0.01


def test_a_saturated_area_is_proposed_with_its_region(clean):
    damaged = clean.copy()
    y, x = np.mgrid[:160, :160]
    area = (y - 60) ** 2 + (x - 90) ** 2 < 35**2
    damaged[7][area] = 255
    suspect = only(suspect_sections(damaged), 7)
    assert suspect.reason.endswith("% saturated") and 10 <= int(suspect.reason.split("%")[0]) <= 18
    assert suspect.region[area].all() and suspect.region.mean() < 2 * area.mean()


@pytest.mark.parametrize("kind", ["dark", "bright"])
def test_a_streak_is_a_fold_or_crack_with_its_region(clean, kind):
    damaged = clean.copy()
    y, x = np.mgrid[:160, :160]
    streak = np.abs((x - 80) * np.cos(0.5) + (y - 80) * np.sin(0.5) - 10) < 4  # 8 pixels wide
    values = damaged[6][streak].astype(float)
    damaged[6][streak] = values * 0.3 if kind == "dark" else 0.3 * values + 0.7 * 255
    suspect = only(suspect_sections(damaged), 6)
    assert suspect.reason == f"fold or crack: {kind} streak"
    assert suspect.region[streak].mean() > 0.9 and suspect.region.mean() < 0.3


def test_damage_that_persists_or_sits_at_the_ends_is_not_proposed(clean):
    damaged = clean.copy()
    damaged[:, :40, :] = 0  # the same blank border in every section: no neighbour could repair it
    damaged[0] = np.random.default_rng(1).integers(0, 255, damaged[0].shape)  # first and last: no neighbour
    damaged[-1, :, 80:] = 255
    assert suspect_sections(damaged) == []


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64, np.int32])
def test_any_grey_value_type_gives_the_same_suspects(clean, dtype):
    damaged = clean.copy()
    damaged[4, :, 80:] = 0
    damaged[8] = np.random.default_rng(3).integers(60, 180, damaged[8].shape)
    scaled = damaged.astype(dtype) * (200 if dtype == np.uint16 else 1)
    assert [(s.index, s.reason.split(" (")[0]) for s in suspect_sections(scaled)] == [
        (4, "50% blank"), (8, "correlates poorly with both neighbours")]


def test_bad_volumes_are_refused_and_tiny_stacks_have_no_suspects(clean):
    with_nan = clean.astype(np.float32)
    with_nan[3, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        suspect_sections(with_nan)
    with pytest.raises(InputError, match="3D stack"):
        suspect_sections(clean[0])
    assert suspect_sections(clean[:2]) == []
    with pytest.raises(ValueError, match="max_run"):
        suspect_sections(clean, max_run=0)
    assert suspect_sections(np.zeros((5, 64, 64), np.uint8)) == []  # nothing to tell apart: not all suspect
