"""Turn free-text answers into task labels: yes/no, road/building counts, 3x3 grid cells.

Every parser works on whole words (so "no" never matches inside "another", "known" or "north")
and returns None when the answer cannot be read; callers count those as unparsed instead of
dropping them. The same parsers read the ChangeChat reference answers, so a reference and a
prediction written in the same format always agree.
"""

import re

from processing.conversation import GRID_CELLS

CATEGORIES = ("roads", "buildings")

_WORD = re.compile(r"\d+|[a-z]+")


def words(text: str) -> list[str]:
    """Lowercase word and digit tokens of `text`; "n't" becomes " not" and hyphens split words."""
    text = str(text).lower().replace("n't", " not").replace("cannot", "can not")
    return _WORD.findall(text)


# ---------------------------------------------------------------------------------------------
# binary: have the two images changed?

_YES_WORDS = {"yes", "yeah", "yep", "true", "changed", "correct"}
_NO_WORDS = {"no", "nope", "false", "unchanged", "none", "nothing"}
_NEGATIONS = {"no", "not", "never", "nothing", "without", "none", "neither", "nor"}
# Word stems that name a change; a negation shortly before one of them flips its meaning.
_CHANGE_STEMS = ("chang", "differ", "modif", "alter", "transform")
# Words that only appear in answers describing an actual change.
_CHANGE_EVENT_WORDS = {
    "new", "built", "constructed", "added", "appeared", "appears", "replaced", "replaces",
    "removed", "demolished", "emerged", "emerge", "emerges", "construction", "increase", "increased",
}
_NO_CHANGE_PHRASES = (
    "same as before", "the same", "identical", "unchanged", "remain the same", "remains the same",
    "stayed the same", "no difference", "no differences",
)
_NEGATION_REACH = 4  # "have not obviously been changed": the negation may sit up to 4 words before the change word


def parse_binary(text: str) -> bool | None:
    """Yes/no answer to "have these two images changed?" -> True (changed), False (unchanged), None.

    Order of evidence: a leading yes/no word ("Yes.", "no, nothing changed"); then a negated change
    word ("have not changed", "there is no difference", "almost nothing has changed") or a
    no-change phrase ("identical", "the same as before"); then a plain change word or change event
    ("changed", "new roads were built").
    """
    tokens = words(text)
    if not tokens:
        return None
    if tokens[0] in _YES_WORDS:
        return True
    if tokens[0] in _NO_WORDS:
        return False
    joined = " ".join(tokens)
    if _has_negated_change(tokens) or any(f" {phrase} " in f" {joined} " for phrase in _NO_CHANGE_PHRASES):
        return False
    if any(token.startswith(_CHANGE_STEMS) for token in tokens) or _CHANGE_EVENT_WORDS.intersection(tokens):
        return True
    if "yes" in tokens and "no" not in tokens:
        return True
    if "no" in tokens and "yes" not in tokens:
        return False
    return None


def _has_negated_change(tokens: list[str]) -> bool:
    for i, token in enumerate(tokens):
        if token.startswith(_CHANGE_STEMS):
            if _NEGATIONS.intersection(tokens[max(0, i - _NEGATION_REACH) : i]):
                return True
    return False


# ---------------------------------------------------------------------------------------------
# count: how many roads and buildings have changed?

_NUMBER_WORDS = {
    "no": 0, "none": 0, "zero": 0, "nil": 0,
    "a": 1, "an": 1, "one": 1, "single": 1,
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50,
}
_CATEGORY_WORDS = {"road": "roads", "roads": "roads", "building": "buildings", "buildings": "buildings"}
# Words that join two category nouns sharing one quantifier: "no new roads or buildings".
_COORDINATORS = {"or", "and", "nor", "new", "changed"}


def _quantity(token: str) -> int | None:
    if token.isdigit():
        return int(token)
    return _NUMBER_WORDS.get(token)


def parse_count(text: str) -> dict | None:
    """Counting answer -> {"roads": int, "buildings": int}, or None when it cannot be read.

    Each category word (road/roads/building/buildings) takes the nearest quantity (digits, number
    words, "a"/"an" = 1, "no"/"none" = 0) on its side of the answer: quantities come before the
    nouns ("three new roads and no buildings") unless a category word comes before every quantity,
    then after them ("roads: 2, buildings: 0"). Two nouns joined only by "or"/"and" share a
    quantifier ("no new roads or buildings", "roads and buildings: none"). A category the answer
    does not name counts 0 ("2 new buildings" says no road changed); a named category without a
    readable quantity ("many roads") makes the answer unparsed. An answer that names no category
    counts 0/0 only when it says nothing changed ("none", "no change", "nothing has changed").
    """
    tokens = words(text)
    mentions = [(i, _CATEGORY_WORDS[t]) for i, t in enumerate(tokens) if t in _CATEGORY_WORDS]
    if not mentions:
        if parse_binary(text) is False or (tokens and all(_quantity(t) == 0 for t in tokens)):
            return {"roads": 0, "buildings": 0}
        return None

    first_quantity = next((i for i, t in enumerate(tokens) if _quantity(t) is not None), len(tokens))
    quantities_after = mentions[0][0] < first_quantity
    values = [_nearest_quantity(tokens, mentions, k, quantities_after) for k in range(len(mentions))]
    # Nouns joined only by coordinators share the quantifier on the quantity side of the phrase.
    neighbours = range(len(mentions) - 2, -1, -1) if quantities_after else range(1, len(mentions))
    for k in neighbours:
        j = k + 1 if quantities_after else k - 1
        low, high = sorted((mentions[k][0], mentions[j][0]))
        if values[k] is None and _only_coordinators(tokens, low, high):
            values[k] = values[j]

    counts = {}
    for (_, category), value in zip(mentions, values):
        if counts.get(category) is None:  # the first mention with a quantity wins
            counts[category] = value
    if any(value is None for value in counts.values()):
        return None
    return {category: counts.get(category, 0) for category in CATEGORIES}


def _nearest_quantity(tokens: list[str], mentions: list[tuple[int, str]], k: int, after: bool) -> int | None:
    """The quantity closest to mention k, looking only between it and its neighbouring mention."""
    position = mentions[k][0]
    if after:
        end = mentions[k + 1][0] if k + 1 < len(mentions) else len(tokens)
        window = range(position + 1, end)
    else:
        start = mentions[k - 1][0] + 1 if k > 0 else 0
        window = range(position - 1, start - 1, -1)
    return next((_quantity(tokens[i]) for i in window if _quantity(tokens[i]) is not None), None)


def _only_coordinators(tokens: list[str], start: int, end: int) -> bool:
    between = tokens[start + 1 : end]
    return bool(between) and all(t in _COORDINATORS for t in between)


# ---------------------------------------------------------------------------------------------
# localization: which of the 3x3 grid cells changed, for roads and for buildings?

_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_CENTRE = {"center", "centre", "middle", "central"}
_POSITION_WORDS = set(_VERTICAL) | set(_HORIZONTAL) | _CENTRE


def parse_localization(text: str) -> dict | None:
    """Localization answer -> {"roads": [cells], "buildings": [cells]} in GRID_CELLS order, or None.

    Reads the authors' format `roads ['top-left', 'center-center'] buildings []` (either quotes),
    its normalised form without punctuation (`roads top-left center-center buildings`) and free
    text ("new buildings at the top left and center"). Cells belong to the nearest category word
    before them (cells written before any category go to the first one after them); two category
    words joined only by "and"/"or" share the cells of the second ("roads and buildings at the
    bottom"). A position with one axis missing takes "center" for it: "center" = center-center,
    "top" = top-center, "left" = center-left (a lone "top" could also mean the whole top row;
    reading it as one cell keeps one word = one label, like "center"). A named category with no
    cells is empty; a category not named is empty. Returns None when the answer names no category
    and does not say that nothing changed.
    """
    tokens = words(text)
    mentions = [(i, _CATEGORY_WORDS[t]) for i, t in enumerate(tokens) if t in _CATEGORY_WORDS]
    if not mentions:
        if parse_binary(text) is False:
            return {"roads": [], "buildings": []}
        return None

    cells: dict[str, set[str]] = {category: set() for category in CATEGORIES}
    ends = [i for i, _ in mentions[1:]] + [len(tokens)]
    for (position, category), end in zip(mentions, ends):
        cells[category] |= _cells_in(tokens[position + 1 : end])
    cells[mentions[0][1]] |= _cells_in(tokens[: mentions[0][0]])  # "top-left: buildings" style
    # "roads and buildings at the bottom": a category followed only by a coordinator shares the next one's cells.
    for k in range(len(mentions) - 2, -1, -1):
        (position, category), (next_position, next_category) = mentions[k], mentions[k + 1]
        if category != next_category and _only_coordinators(tokens, position, next_position):
            cells[category] |= cells[next_category]
    return {category: [cell for cell in GRID_CELLS if cell in cells[category]] for category in CATEGORIES}


def _cells_in(tokens: list[str]) -> set[str]:
    """Grid cells named in a run of words; adjacent position words pair up ("top left", "left top")."""
    found, i = set(), 0
    while i < len(tokens):
        if tokens[i] not in _POSITION_WORDS:
            i += 1
            continue
        pair = _cell_from_pair(tokens[i], tokens[i + 1]) if i + 1 < len(tokens) else None
        if pair is not None:
            found.add(pair)
            i += 2
        else:
            found.add(_cell_from_single(tokens[i]))
            i += 1
    return found


def _cell_from_single(word: str) -> str:
    if word in _VERTICAL:
        return f"{_VERTICAL[word]}-center"
    if word in _HORIZONTAL:
        return f"center-{_HORIZONTAL[word]}"
    return "center-center"


def _cell_from_pair(first: str, second: str) -> str | None:
    """Two adjacent position words -> one cell, or None when they cannot form one ("left right")."""
    def axis(word):
        if word in _VERTICAL:
            return "v", _VERTICAL[word]
        if word in _HORIZONTAL:
            return "h", _HORIZONTAL[word]
        if word in _CENTRE:
            return "c", "center"
        return None, None

    (kind_a, a), (kind_b, b) = axis(first), axis(second)
    if kind_a is None or kind_b is None or (kind_a == kind_b and kind_a != "c"):
        return None
    if kind_a == "v" or kind_b == "h":  # "top left", "center right", "top center"
        return f"{a}-{b}"
    return f"{b}-{a}"  # "left top", "right center", "center top"


__all__ = ["CATEGORIES", "parse_binary", "parse_count", "parse_localization", "words"]
