"""Prompt text for DeltaVLM: the ChangeChat task prompts, the caption normalisation the released
checkpoint was trained with, and the conversion of a multi-turn dialogue into (prompt, answer) pairs.

Pure functions on strings, shared by the processor's chat template, training and evaluation.

The released checkpoint saw every dialogue round i as one sample (authors' `dataset.py`):

    prompt = "q: Q1 a: A1  q: Q2 a: A2  q: Qi"      target = Ai

and both sides went through LAVIS' "blip_caption" normalisation (lowercase, `. ! " ( ) * # : ; ~`
replaced by spaces, whitespace collapsed, first 50 words kept). So it expects e.g.
`q please judge whether these two images have changed please answer yes or no a no q ...`.
"""

import re
import warnings

# ChangeChat-105k prompts (the exact strings of the released test files).
TASK_PROMPTS = {
    "caption": "Please briefly describe the changes in these two images.",
    "binary": "Please judge whether these two images have changed. Please answer yes or no.",
    "count": "Please determine how many roads and buildings have changed?",
    "localization": (
        "Please indicate the locations where changes have occurred in the buildings and roads, using a 3x3 grid "
        "(namely, 'top', 'center', and 'bottom' vertically and 'left', 'center', 'right' horizontally)."
    ),
    "dialogue_summary": "Based on the above analysis, please describe the changes of these two images in detail.",
}

# The nine cells of the localization task, in the authors' label order (row-major).
GRID_CELLS = (
    "top-left", "top-center", "top-right",
    "center-left", "center-center", "center-right",
    "bottom-left", "bottom-center", "bottom-right",
)

IMAGE_PLACEHOLDER = "<image>"  # ChangeChat questions start with "<image> <image>"; the model never sees it
MAX_PROMPT_WORDS = 50  # blip_caption's max_words in the authors' training config

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")


def normalize_text(text: str, max_words: int | None = MAX_PROMPT_WORDS, truncation_side: str = "left") -> str:
    """LAVIS "blip_caption" normalisation: lowercase, drop `. ! " ( ) * # : ; ~`, collapse whitespace.

    `max_words` keeps at most that many words. The authors kept the FIRST 50 words
    (`truncation_side="right"`), which cuts the current question out of long dialogues; the
    default keeps the LAST ones so the question survives, and warns.
    """
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    if max_words is not None and len(words) > max_words:
        warnings.warn(
            f"prompt of {len(words)} words truncated to {max_words} (dropped from the {truncation_side})",
            stacklevel=2,
        )
        words = words[-max_words:] if truncation_side == "left" else words[:max_words]
    return " ".join(words)


def strip_image_placeholders(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def format_dialogue_prompt(history: list[tuple[str, str]], question: str) -> str:
    """The raw (un-normalised) prompt of one dialogue round, exactly as the authors built it.

    history: earlier (question, answer) rounds; question: the current one.
    """
    context = " ".join(f" q: {q} a: {a}" for q, a in history).strip()
    if not context:
        return "q: " + question
    return context + "  q: " + question


def conversation_to_rounds(conversations: list[dict]) -> list[tuple[str, str]]:
    """ChangeChat `conversations` ([{"from": "human"|"gpt", "value": ...}, ...]) -> [(question, answer), ...].

    Raises ValueError naming the turn when the list does not alternate human/gpt or ends without an answer.
    """
    if not isinstance(conversations, list):
        raise ValueError(f"a conversation must be a list of turns, got {type(conversations).__name__}")
    if not conversations:
        raise ValueError("conversation is empty")
    if len(conversations) % 2:
        raise ValueError(
            f"conversation has {len(conversations)} turns; expected human/gpt pairs (the last question has no answer)"
        )
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is a {type(turn).__name__}; expected an object {{'from': ..., 'value': ...}}")
        if not isinstance(turn.get("value", ""), str):
            raise ValueError(f"turn {i}: 'value' must be a string, got {type(turn['value']).__name__}")
    rounds = []
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(
                f"turns {i} and {i + 1} are from {human.get('from')!r} and {gpt.get('from')!r}; expected 'human' then 'gpt'"
            )
        rounds.append((strip_image_placeholders(human.get("value", "")), gpt.get("value", "")))
    return rounds


def expand_rounds(rounds: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One (raw prompt, answer) training sample per round, earlier answers = ground truth."""
    return [(format_dialogue_prompt(rounds[:i], question), answer) for i, (question, answer) in enumerate(rounds)]


def messages_to_rounds(messages: list[dict]) -> tuple[list[tuple[str, str]], str]:
    """Chat messages ([{"role": "user"|"assistant", "content": str}, ...], ending with a user turn) ->
    (history rounds, current question)."""
    for i, message in enumerate(messages or []):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is a {type(message).__name__}; expected {{'role': ..., 'content': ...}}")
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a conversation must end with a 'user' message (the question to answer)")
    history, pending = [], None
    for i, message in enumerate(messages[:-1]):
        role, content = message.get("role"), _message_text(message)
        if role == "user" and pending is None:
            pending = content
        elif role == "assistant" and pending is not None:
            history.append((pending, content))
            pending = None
        else:
            raise ValueError(f"message {i} has role {role!r}; expected user and assistant turns to alternate")
    if pending is not None:
        raise ValueError("two consecutive 'user' messages: an assistant answer is missing")
    return history, _message_text(messages[-1])


def _message_text(message: dict) -> str:
    content = message.get("content", "")
    if isinstance(content, list):  # transformers' typed content: [{"type": "text", "text": ...}, {"type": "image"}]
        content = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return strip_image_placeholders(str(content))


def task_of_question(question: str) -> str:
    """The ChangeChat task a question asks for, by its prompt text ("open" when it is none of the fixed ones)."""
    text = _squash(question)
    for task, prompt in (
        ("caption", TASK_PROMPTS["caption"]),
        ("caption", TASK_PROMPTS["dialogue_summary"]),
        ("binary", TASK_PROMPTS["binary"]),
        ("count", TASK_PROMPTS["count"]),
        ("localization", TASK_PROMPTS["localization"]),
    ):
        if _squash(prompt) in text:
            return task
    return "open"


def _squash(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


__all__ = [
    "GRID_CELLS",
    "TASK_PROMPTS",
    "conversation_to_rounds",
    "expand_rounds",
    "format_dialogue_prompt",
    "messages_to_rounds",
    "normalize_text",
    "strip_image_placeholders",
    "task_of_question",
]
