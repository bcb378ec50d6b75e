"""Answer parsers: the phrasings models and references actually produce, and the traps
(the authors' count parser read "no" inside "another")."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eval.parsers import parse_binary, parse_count, parse_localization
from processing.conversation import GRID_CELLS


@pytest.mark.parametrize("text", [
    "Yes", "yes", "Yes.", "yes, they have changed", "YES the images changed", "Changes have occurred.",
    "the two images are different", "a new road was built in the north", "there are some changes",
    "changed", "the buildings were demolished",
    # one category denied, the other reported: something changed
    "the roads have not changed, but new buildings were built",
    "There are no changes to the roads, but several houses appeared",
    "there are no changes except a new building",
    "Have the images changed? Yes, a road was built", "Ｙｅｓ",
])
def test_binary_changed(text):
    assert parse_binary(text) is True


@pytest.mark.parametrize("text", [
    "No", "no.", "No.", "no change", "No changes.", "the images have not changed", "there is no difference",
    "The two scenes seem identical.", "the scene is the same as before", "almost nothing has changed",
    "they haven't changed", "nothing has changed", "the images are not different", "unchanged",
    "no obvious changes can be seen", "the images did not really change at all", "none",
    "Changes? No.", "no roads or buildings were built", "no new buildings were constructed",
])
def test_binary_unchanged(text):
    assert parse_binary(text) is False


@pytest.mark.parametrize("text", ["", "   ", "I don't know", "maybe", "the picture shows a city"])
def test_binary_unparsed(text):
    assert parse_binary(text) is None


@pytest.mark.parametrize("text, expected", [
    ("three new roads and no buildings", (3, 0)),
    ("No roads has changed, and no buildings has changed.", (0, 0)),
    ("2 roads and 1 building", (2, 1)),
    ("none", (0, 0)),
    ("there are 2 new roads and 13 new buildings", (2, 13)),
    ("a road and 2 buildings", (1, 2)),
    ("one road has changed and no buildings", (1, 0)),
    ("there are no changes in roads or buildings", (0, 0)),  # the authors' no-change sentence
    ("no new roads or buildings", (0, 0)),
    ("roads: 2, buildings: 0", (2, 0)),
    ("roads and buildings: none", (0, 0)),
    ("the number of roads is 2 and the number of buildings is 3", (2, 3)),
    ("3 new buildings", (0, 3)),  # an unnamed category did not change
    ("another 2 buildings and no roads", (0, 2)),  # "no" inside "another" is not a quantity
    ("2 new roads to the north and 1 building", (2, 1)),  # nor inside "north"
    ("known: 4 roads, 5 buildings", (4, 5)),  # nor inside "known"
    ("nothing has changed", (0, 0)),
    ("Twenty buildings and eleven roads", (11, 20)),
    ("2 roads have changed, and twenty-one buildings have changed.", (2, 21)),
    ("There are twenty-five new buildings", (0, 25)),
    ("There are 1,024 new buildings", (0, 1024)),
    ("a couple of buildings", (0, 2)),
    # nouns not joined by a conjunction do not share a quantity; a noun bare on its side looks at the other one
    ("no new roads, new buildings: 3", (0, 3)),
    ("2 roads changed, buildings unchanged", (2, 0)),
    ("roads: 2, 3 buildings", (2, 3)),
])
def test_count(text, expected):
    assert parse_count(text) == {"roads": expected[0], "buildings": expected[1]}


@pytest.mark.parametrize("text", ["another building", "many roads and some buildings", "", "a city", "north",
                                  "no roads changed but buildings changed"])
def test_count_unparsed(text):
    assert parse_count(text) is None


def loc(roads=(), buildings=()):
    return {"roads": list(roads), "buildings": list(buildings)}


@pytest.mark.parametrize("text, expected", [
    ("roads ['top-left', 'center-center'] buildings []", loc(["top-left", "center-center"])),
    ('roads ["top-left"] buildings ["bottom-right", "center-left"]', loc(["top-left"], ["center-left", "bottom-right"])),
    ("roads [] buildings []", loc()),
    ("roads top-left center-center buildings", loc(["top-left", "center-center"])),
    ("roads  buildings bottom-right top-right", loc([], ["top-right", "bottom-right"])),
    ("new buildings at the top left and center", loc([], ["top-left", "center-center"])),
    ("roads and buildings at the bottom", loc(["bottom-center"], ["bottom-center"])),
    ("buildings in the upper right corner and left middle; no roads", loc([], ["top-right", "center-left"])),
    ("new buildings at the top", loc([], ["top-center"])),  # a missing axis is "center"
    ("roads on the left, buildings in the middle", loc(["center-left"], ["center-center"])),
    ("no change", loc()),
    ("Roads ['Top-Left'] Buildings ['Bottom-Center']", loc(["top-left"], ["bottom-center"])),
    # "new"/"changed" alone between two categories do not join them: the cells stay with their own category
    ("no new roads, new buildings at the top left", loc([], ["top-left"])),
    ("no roads changed, buildings changed at the bottom right", loc([], ["bottom-right"])),
    ("roads [] new buildings ['top-left']", loc([], ["top-left"])),
    ("new roads and new buildings at the top", loc(["top-center"], ["top-center"])),
])
def test_localization(text, expected):
    assert parse_localization(text) == expected


@pytest.mark.parametrize("text", ["", "top-left", "something changed at the top", "maybe"])
def test_localization_unparsed(text):
    assert parse_localization(text) is None


@given(st.sets(st.sampled_from(GRID_CELLS)), st.sets(st.sampled_from(GRID_CELLS)), st.sampled_from(["'", '"']))
def test_localization_reads_every_authors_answer(roads, buildings, quote):
    def as_list(cells):
        return "[" + ", ".join(f"{quote}{c}{quote}" for c in cells) + "]"

    text = f"roads {as_list(roads)} buildings {as_list(buildings)}"
    assert parse_localization(text) == {
        "roads": [c for c in GRID_CELLS if c in roads],
        "buildings": [c for c in GRID_CELLS if c in buildings],
    }


@given(st.integers(0, 999), st.integers(0, 999))
def test_count_reads_digit_answers(roads, buildings):
    assert parse_count(f"There are {roads} new roads and {buildings} new buildings.") == {
        "roads": roads, "buildings": buildings,
    }
