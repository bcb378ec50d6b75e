"""Text for a synthetic pair: LEVIR-CC style captions and the answers of the ChangeChat tasks.

Answer formats (one consistent form each, so parsers and scorers can rely on them):

- binary: "Yes" / "No".
- count: "<R> changed, and <B> changed." where each part is "no roads has" (the authors' wording
  for zero), "1 road has" or "<n> roads have" — e.g. "2 roads have changed, and 1 building has
  changed." and, for an unchanged pair, exactly "No roads has changed, and no buildings has changed."
  A count is the number of changed objects of that kind, added plus removed. `parse_count_answer`
  reads it back.
- localization: "roads [<cells>] buildings [<cells>]" with Python list reprs of GRID_CELLS names in
  grid order, e.g. "roads ['top-left', 'center-center'] buildings []".
- open QA: short answers — a digit for "how many", "Yes"/"No", a place phrase for "where", a few
  words for land cover and kind of change.
- captions: lowercase, no punctuation, in the tone of LEVIR-CC ("two houses are built on the
  bareland at the bottom"). Unchanged pairs get exactly the five LEVIR-CC no-change sentences.
"""

import re
from dataclasses import dataclass, field

import numpy as np

from processing.conversation import GRID_CELLS

NO_CHANGE_CAPTIONS = (
    "there is no difference",
    "the two scenes seem identical",
    "the scene is the same as before",
    "no change has occurred",
    "almost nothing has changed",
)

GROUPS = ("roads_added", "roads_removed", "buildings_added", "buildings_removed")


@dataclass
class GroundTruth:
    """What changed between A and B, and a few facts about the scene; all exact."""

    roads_added: int
    roads_removed: int
    buildings_added: int
    buildings_removed: int
    road_cells: list  # grid cells touched by changed roads, in GRID_CELLS order
    building_cells: list
    group_cells: dict = field(default_factory=dict)  # cells per group in GROUPS (for captions)
    terrain: str = "grass"
    has_water: bool = False
    num_trees: int = 0  # trees with canopy pixels inside the image (A's frame)

    @property
    def roads_changed(self) -> int:
        return self.roads_added + self.roads_removed

    @property
    def buildings_changed(self) -> int:
        return self.buildings_added + self.buildings_removed

    @property
    def changeflag(self) -> int:
        return int(self.roads_changed + self.buildings_changed > 0)

    def as_dict(self) -> dict:
        return {
            "changeflag": self.changeflag,
            "roads_added": self.roads_added,
            "roads_removed": self.roads_removed,
            "buildings_added": self.buildings_added,
            "buildings_removed": self.buildings_removed,
            "roads_changed": self.roads_changed,
            "buildings_changed": self.buildings_changed,
            "road_cells": list(self.road_cells),
            "building_cells": list(self.building_cells),
            "terrain": self.terrain,
            "has_water": self.has_water,
            "num_trees": self.num_trees,
        }


# ----------------------------------------------------------------------------------------------
# Task answers


def binary_answer(truth: GroundTruth) -> str:
    return "Yes" if truth.changeflag else "No"


def _count_part(n: int, noun: str) -> str:
    if n == 0:
        return f"no {noun}s has"
    return f"1 {noun} has" if n == 1 else f"{n} {noun}s have"


def count_answer(truth: GroundTruth) -> str:
    text = f"{_count_part(truth.roads_changed, 'road')} changed, and {_count_part(truth.buildings_changed, 'building')} changed."
    return text[0].upper() + text[1:]


def parse_count_answer(text: str) -> tuple:
    """(roads, buildings) from a count answer in the form above; None for a part that is missing."""

    def number(noun):
        match = re.search(rf"\b(no|\d+)\s+(?:new\s+|changed\s+)?{noun}s?\b", text.lower())
        if match is None:
            return None
        return 0 if match.group(1) == "no" else int(match.group(1))

    return number("road"), number("building")


def localization_answer(truth: GroundTruth) -> str:
    return f"roads {list(truth.road_cells)!r} buildings {list(truth.building_cells)!r}"


# ----------------------------------------------------------------------------------------------
# Places on the 3x3 grid, in words

_CELL_PHRASES = {
    "top-left": ("at the top left", "in the top left corner"),
    "top-center": ("at the top", "in the upper middle"),
    "top-right": ("at the top right", "in the top right corner"),
    "center-left": ("on the left", "on the left side"),
    "center-center": ("in the center", "in the middle"),
    "center-right": ("on the right", "on the right side"),
    "bottom-left": ("at the bottom left", "in the bottom left corner"),
    "bottom-center": ("at the bottom", "in the lower middle"),
    "bottom-right": ("at the bottom right", "in the bottom right corner"),
}
_ROW_PHRASES = {"top": ("at the top", "on the top side"), "center": ("in the middle",), "bottom": ("at the bottom", "on the bottom side")}
_COLUMN_PHRASES = {"left": ("on the left", "on the left side"), "center": ("in the middle",), "right": ("on the right", "on the right side")}


def location_phrases(cells) -> tuple:
    """Ways to say where a set of grid cells is ("at the top left", "on the left side"); () when the
    cells span more than one row and more than one column (no short phrase is true then)."""
    cells = list(cells)
    if not cells:
        return ()
    if len(cells) == 1:
        return _CELL_PHRASES[cells[0]]
    rows = {c.split("-")[0] for c in cells}
    columns = {c.split("-")[1] for c in cells}
    if len(rows) == 1:
        return _ROW_PHRASES[rows.pop()]
    if len(columns) == 1:
        return _COLUMN_PHRASES[columns.pop()]
    return ()


def describe_place(cells) -> str:
    """A short, deterministic answer to "where": a phrase if one is true, else the cell names."""
    phrases = location_phrases(cells)
    if phrases:
        return phrases[0]
    if not cells:
        return "nowhere"
    names = [c.replace("-", " ") for c in cells]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ----------------------------------------------------------------------------------------------
# Captions

_LAND_WORDS = {
    "grass": ("meadow", "grassland", "grass"),
    "bare": ("bareland", "bare land", "open space"),
    "desert": ("desert", "bareland", "sand"),
    "mixed": ("bareland", "grassland", "open space"),
}
_BUILDING_NOUNS = (("house", "houses"), ("building", "buildings"), ("villa", "villas"))
_ROAD_NOUNS = (("road", "roads"), ("road", "roads"), ("path", "paths"), ("street", "streets"))
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}

# Clause templates per change group. {np}: noun phrase; verbs agree with it via {be}/{have}/{s}.
_TEMPLATES = {
    "buildings_added": (
        "{np} {be} built{loc}",
        "{np} {be} constructed on the {land}{loc}",
        "{np} appear{s}{loc}",
        "{np} {have} been built{loc}",
        "{np} appear{s} on the {land}{loc}",
        "{np} show{s} up{loc}",
        "{np} {be} erected{loc}",
    ),
    "buildings_removed": (
        "{np} {be} demolished{loc}",
        "{np} disappear{s}{loc}",
        "{np} {have} been removed{loc}",
        "{np} {be} torn down{loc}",
        "{np}{loc} {be} replaced by bare land",
    ),
    "roads_added": (
        "{np} {be} built{loc}",
        "{np} appear{s}{loc}",
        "{np} {have} been built{loc}",
        "{np} {be} built on the {land}{loc}",
        "{np} {be} paved{loc}",
    ),
    "roads_removed": (
        "{np} disappear{s}{loc}",
        "{np} {be} removed{loc}",
        "{np} {have} been removed{loc}",
        "{np}{loc} {be} no longer there",
    ),
}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _quantity(rng, n: int) -> str:
    if n == 1:
        return "a"
    if n == 2:
        return "two"
    if n == 3:
        return _pick(rng, ("three", "three", "some"))
    return _pick(rng, (_NUMBER_WORDS.get(n, "many"), "several", "some", "many" if n >= 5 else "several"))


def _noun_phrase(rng, n: int, nouns, adjective: str = "") -> tuple:
    """(phrase, plural?) e.g. ("two new houses", True)."""
    singular, plural = _pick(rng, nouns)
    noun = singular if n == 1 else plural
    words = [_quantity(rng, n)] + ([adjective] if adjective else []) + [noun]
    return " ".join(words), n > 1


def _verbs(plural: bool) -> dict:
    return {"be": "are" if plural else "is", "have": "have" if plural else "has", "s": "" if plural else "s"}


def _loc(rng, cells, keep: float = 0.75) -> str:
    phrases = location_phrases(cells)
    if not phrases or rng.random() > keep:
        return ""
    return " " + _pick(rng, phrases)


def _clause(rng, truth: GroundTruth, group: str, land: str) -> str:
    n = getattr(truth, group)
    nouns = _ROAD_NOUNS if group.startswith("road") else _BUILDING_NOUNS
    adjective = "new" if group.endswith("added") and rng.random() < 0.4 else ""
    np_text, plural = _noun_phrase(rng, n, nouns, adjective)
    template = _pick(rng, _TEMPLATES[group])
    return template.format(np=np_text, land=land, loc=_loc(rng, truth.group_cells.get(group, [])), **_verbs(plural))


def _road_with_houses(rng, truth: GroundTruth, land: str) -> str:
    """The common LEVIR-CC picture of a new road with new houses along it."""
    houses, plural = _noun_phrase(rng, truth.buildings_added, _BUILDING_NOUNS)
    cells = sorted(set(truth.group_cells["roads_added"]) | set(truth.group_cells["buildings_added"]), key=GRID_CELLS.index)
    loc = _loc(rng, cells)
    options = (
        f"a road is built{loc} and {houses} {_verbs(plural)['be']} constructed along it",
        f"a road with {houses} appears{loc}",
        f"a new road and {houses} appear on the {land}{loc}",
        f"{houses} {_verbs(plural)['be']} built along a new road{loc}",
    )
    return _pick(rng, options)


def _one_caption(rng, truth: GroundTruth) -> str:
    land = _pick(rng, _LAND_WORDS[truth.terrain])
    groups = [g for g in GROUPS if getattr(truth, g)]
    if truth.roads_added == 1 and truth.buildings_added and not truth.roads_removed and not truth.buildings_removed:
        if rng.random() < 0.5:
            return _road_with_houses(rng, truth, land)
    if len(groups) > 1 and rng.random() < 0.5:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return " and ".join(_clause(rng, truth, g, land) for g in groups)


def make_captions(rng: np.random.Generator, truth: GroundTruth, count: int = 5) -> list:
    """`count` different reference captions (the five LEVIR-CC sentences for an unchanged pair)."""
    if not truth.changeflag:
        return list(NO_CHANGE_CAPTIONS)[:count]
    captions = []
    for _ in range(60):
        caption = _one_caption(rng, truth)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            break
    while len(captions) < count:  # a very plain change can run out of distinct wordings
        captions.append(captions[len(captions) % max(len(captions), 1)])
    return captions


# ----------------------------------------------------------------------------------------------
# Open questions


_LAND_COVER = {"grass": "grassland", "bare": "bare land", "desert": "desert", "mixed": "grassland and bare land"}


def _yes_no(flag) -> str:
    return "Yes" if flag else "No"


def _kind_of_change(truth: GroundTruth) -> str:
    parts = []
    if truth.buildings_added:
        parts.append("new buildings were constructed" if truth.buildings_added > 1 else "a new building was constructed")
    if truth.roads_added:
        parts.append("new roads were built" if truth.roads_added > 1 else "a new road was built")
    if truth.buildings_removed:
        parts.append("buildings were demolished" if truth.buildings_removed > 1 else "a building was demolished")
    if truth.roads_removed:
        parts.append("roads were removed" if truth.roads_removed > 1 else "a road was removed")
    return " and ".join(parts) if parts else "no change"


def open_questions(truth: GroundTruth) -> list:
    """(question, answer) pairs answerable from the scene's ground truth."""
    questions = [
        ("How many new buildings were constructed?", str(truth.buildings_added)),
        ("How many buildings were demolished?", str(truth.buildings_removed)),
        ("How many new roads were built?", str(truth.roads_added)),
        ("Were any roads removed?", _yes_no(truth.roads_removed)),
        ("Did any buildings change?", _yes_no(truth.buildings_changed)),
        ("Is there water in the scene?", _yes_no(truth.has_water)),
        ("Are there any trees in the scene?", _yes_no(truth.num_trees)),
        ("What is the main land cover in the scene?", _LAND_COVER[truth.terrain]),
        ("What kind of change happened between the two images?", _kind_of_change(truth)),
    ]
    if truth.buildings_added:
        questions.append(("Where were the new buildings built?", describe_place(truth.group_cells["buildings_added"])))
    if truth.roads_added == 1:
        questions.append(("Where was the new road built?", describe_place(truth.group_cells["roads_added"])))
    if truth.buildings_removed:
        questions.append(("Where were buildings demolished?", describe_place(truth.group_cells["buildings_removed"])))
    return questions


def pick_open_question(rng: np.random.Generator, truth: GroundTruth) -> tuple:
    questions = open_questions(truth)
    # Ask about what changed more often than about static facts when there is a change.
    weights = np.array([2.0 if truth.changeflag and ("new" in q or "demolished" in q or "kind" in q) else 1.0 for q, _ in questions])
    return questions[int(rng.choice(len(questions), p=weights / weights.sum()))]
