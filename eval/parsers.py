"""Turn free-text answers into task labels: yes/no, road/building counts, 3x3 grid cells.

Every parser works on whole words (so "no" never matches inside "another", "known" or "north")
and returns None when the answer cannot be read; callers count those as unparsed instead of
dropping them. The same parsers read the ChangeChat reference answers, so a reference and a
prediction written in the same format always agree.
"""

import re
import unicodedata

from processing.conversation import GRID_CELLS

CATEGORIES = ("roads", "buildings")

_WORD = re.compile(r"\d+|[a-z]+")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,024" is one number, not "1" and "024"


def words(text: str) -> list[str]:
    """Lowercase word and digit tokens of `text`; "n't" becomes " not" and hyphens split words.
    NFKC first, so full-width letters and digits ("Ｙｅｓ", "３") read as their ASCII forms."""
    text = unicodedata.normalize("NFKC", str(text)).lower().replace("n't", " not").replace("cannot", "can not")
    return _WORD.findall(_THOUSANDS_COMMA.sub("", text))


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

    An answer that repeats the question first ("Changes? No.") is read after its last "?". Order of
    evidence: a leading yes/no word ("Yes.", "no, nothing changed"); then clause by clause (split at
    punctuation and at "but", "however", "except", ...): a clause that reports a change ("changed",
    "new roads were built") makes the answer "changed" even when another clause denies one ("the
    roads have not changed, but new buildings were built": something changed); a clause with a
    negated change word ("have not changed", "there is no difference", "almost nothing has changed"),
    a negated change event ("no new buildings were built") or a no-change phrase ("identical", "the
    same as before") reports none; then a lone "yes" or "no" anywhere.
    """
    text = str(text)
    answer = text.rsplit("?", 1)[-1] if "?" in text else text
    verdict = _binary_verdict(answer) if words(answer) else None
    return verdict if verdict is not None or answer == text else _binary_verdict(text)


# Where one statement ends and the next begins: "the roads have not changed, but new buildings were built".
_CLAUSE_BREAK = re.compile(r"[.,;:!?]|\b(?:but|however|though|although|whereas|except|yet)\b")


def _binary_verdict(text: str) -> bool | None:
    tokens = words(text)
    if not tokens:
        return None
    if tokens[0] in _YES_WORDS:
        return True
    if tokens[0] in _NO_WORDS:
        return False
    clauses = [words(part) for part in _CLAUSE_BREAK.split(unicodedata.normalize("NFKC", text).lower())]
    verdicts = [_clause_verdict(clause) for clause in clauses if clause]
    if True in verdicts:
        return True
    if False in verdicts:
        return False
    if "yes" in tokens and "no" not in tokens:
        return True
    if "no" in tokens and "yes" not in tokens:
        return False
    return None


def _clause_verdict(tokens: list[str]) -> bool | None:
    """True: the clause reports a change; False: it denies one; None: it says neither."""
    joined = " ".join(tokens)
    names_event = bool(_CHANGE_EVENT_WORDS.intersection(tokens))
    if (_has_negated_change(tokens) or any(f" {phrase} " in f" {joined} " for phrase in _NO_CHANGE_PHRASES)
            or (names_event and _NEGATIONS.intersection(tokens))):
        return False
    if names_event or any(token.startswith(_CHANGE_STEMS) for token in tokens):
        return True
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
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "couple": 2,
}
_TENS = {"twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"}
_CATEGORY_WORDS = {"road": "roads", "roads": "roads", "building": "buildings", "buildings": "buildings"}
# Words that may join two category nouns sharing one quantifier ("no new roads or new buildings"); the
# join needs one real conjunction among them: in "no new roads, new buildings: 3" the nouns do not share.
_COORDINATORS = {"or", "and", "nor", "new", "changed"}
_CONJUNCTIONS = {"or", "and", "nor"}


def _quantity(token: str) -> int | None:
    if token.isdigit():
        return int(token)
    return _NUMBER_WORDS.get(token)


def parse_count(text: str) -> dict | None:
    """Counting answer -> {"roads": int, "buildings": int}, or None when it cannot be read.

    Each category word (road/roads/building/buildings) takes the nearest quantity (digits, number
    words including "twenty-one", "a"/"an" = 1, "no"/"none" = 0) on its side of the answer:
    quantities come before the nouns ("three new roads and no buildings") unless a category word
    comes before every quantity, then after them ("roads: 2, buildings: 0"). Two nouns joined by
    "or"/"and" share a quantifier ("no new roads or buildings", "roads and buildings: none"). A noun
    with nothing on its side looks at the other side for a quantity no other noun took ("no new
    roads, new buildings: 3"), or for a denial there ("2 roads changed, buildings unchanged": 0).
    A category the answer does not name counts 0 ("2 new buildings" says no road changed); a named
    category without a readable quantity ("many roads") makes the answer unparsed. An answer that
    names no category counts 0/0 only when it says nothing changed ("none", "nothing has changed").
    """
    tokens = _merge_compound_numbers(words(text))
    mentions = [(i, _CATEGORY_WORDS[t]) for i, t in enumerate(tokens) if t in _CATEGORY_WORDS]
    if not mentions:
        if parse_binary(text) is False or (tokens and all(_quantity(t) == 0 for t in tokens)):
            return {"roads": 0, "buildings": 0}
        return None

    first_quantity = next((i for i, t in enumerate(tokens) if _quantity(t) is not None), len(tokens))
    quantities_after = mentions[0][0] < first_quantity
    found = [_nearest_quantity(tokens, mentions, k, quantities_after) for k in range(len(mentions))]
    values = [None if index is None else _quantity(tokens[index]) for index in found]
    # Nouns joined by a conjunction share the quantifier on the quantity side of the phrase.
    neighbours = range(len(mentions) - 2, -1, -1) if quantities_after else range(1, len(mentions))
    for k in neighbours:
        j = k + 1 if quantities_after else k - 1
        low, high = sorted((mentions[k][0], mentions[j][0]))
        if values[k] is None and _joined_by_conjunction(tokens, low, high):
            values[k] = values[j]
    # A noun still without a quantity: the other side, skipping the quantities other nouns took.
    taken = {index for index in found if index is not None}
    for k in range(len(mentions)):
        if values[k] is None:
            values[k] = _other_side_quantity(tokens, mentions, k, quantities_after, taken)

    counts = {}
    for (_, category), value in zip(mentions, values):
        if counts.get(category) is None:  # the first mention with a quantity wins
            counts[category] = value
    if any(value is None for value in counts.values()):
        return None
    return {category: counts.get(category, 0) for category in CATEGORIES}


def _merge_compound_numbers(tokens: list[str]) -> list[str]:
    """["twenty", "one"] -> ["21"]: hyphenated tens and units are one number ("twenty-one buildings")."""
    merged = []
    for token in tokens:
        unit = _NUMBER_WORDS.get(token)
        if merged and merged[-1] in _TENS and unit is not None and 1 <= unit <= 9 and token not in ("a", "an"):
            merged[-1] = str(_NUMBER_WORDS[merged[-1]] + unit)
        else:
            merged.append(token)
    return merged


def _window(tokens: list[str], mentions: list[tuple[int, str]], k: int, after: bool) -> range:
    """Token positions between mention k and its neighbouring mention on one side, nearest first."""
    position = mentions[k][0]
    if after:
        end = mentions[k + 1][0] if k + 1 < len(mentions) else len(tokens)
        return range(position + 1, end)
    start = mentions[k - 1][0] + 1 if k > 0 else 0
    return range(position - 1, start - 1, -1)


def _nearest_quantity(tokens: list[str], mentions: list[tuple[int, str]], k: int, after: bool) -> int | None:
    """Position of the quantity closest to mention k on the quantity side, or None."""
    return next((i for i in _window(tokens, mentions, k, after) if _quantity(tokens[i]) is not None), None)


def _other_side_quantity(tokens, mentions, k: int, after: bool, taken: set) -> int | None:
    """Mention k's quantity read on the other side: the nearest one no other noun took, else 0 when
    the words there deny a change ("buildings unchanged"), else None."""
    window = list(_window(tokens, mentions, k, not after))
    index = next((i for i in window if i not in taken and _quantity(tokens[i]) is not None), None)
    if index is not None:
        taken.add(index)
        return _quantity(tokens[index])
    if window and parse_binary(" ".join(tokens[i] for i in sorted(window))) is False:
        return 0
    return None


def _joined_by_conjunction(tokens: list[str], start: int, end: int) -> bool:
    between = tokens[start + 1 : end]
    return bool(between) and all(t in _COORDINATORS for t in between) and bool(_CONJUNCTIONS.intersection(between))


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
        if category != next_category and _joined_by_conjunction(tokens, position, next_position):
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
