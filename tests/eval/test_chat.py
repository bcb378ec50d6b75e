"""`deltavlm chat` through the real entry point, driven by scripted stdin, on a tiny random model saved to tmp."""

import io
import json

import numpy as np
import pytest
from PIL import Image

import deltavlm_cli
from processing.conversation import TASK_PROMPTS, normalize_text

import eval.chat

FAST = ["--num-beams", "1", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture
def pairs(tmp_path):
    """Two pairs of small random images: [(before, after), (before, after)]."""
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        pair = []
        for side in ("a", "b"):
            path = tmp_path / f"{side}{k}.png"
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
            pair.append(str(path))
        paths.append(tuple(pair))
    return paths


@pytest.fixture
def spies(monkeypatch):
    """Record every vision-side call and every conversation sent to the model."""
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    record = {"vision_calls": 0, "conversations": []}
    real_pair_embeds, real_answer = DeltaVLMForConditionalGeneration.get_pair_embeds, eval.chat.answer

    def counting_pair_embeds(self, *args, **kwargs):
        record["vision_calls"] += 1
        return real_pair_embeds(self, *args, **kwargs)

    def recording_answer(model, processor, pair_embeds, conversations, *args, **kwargs):
        record["conversations"].extend(conversations)
        return real_answer(model, processor, pair_embeds, conversations, *args, **kwargs)

    monkeypatch.setattr(DeltaVLMForConditionalGeneration, "get_pair_embeds", counting_pair_embeds)
    monkeypatch.setattr(eval.chat, "answer", recording_answer)
    return record


def chat(capsys, monkeypatch, model_dir, pair, script: str, *extra):
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    status = deltavlm_cli.main(["chat", "--model", str(model_dir), "--before", pair[0], "--after", pair[1], *FAST, *extra])
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def user(text):
    return {"role": "user", "content": text}


def test_dialogue_with_pair_switch_reset_and_save(capsys, monkeypatch, model_dir, pairs, spies, tmp_path):
    transcript = tmp_path / "transcript.json"
    script = "\n".join([
        "What changed?",
        "/count",
        "Where?",
        f"/pair {pairs[1][0]} {pairs[1][1]}",
        "Anything new here?",
        "/reset",
        "And now?",
        f"/save {transcript}",
        "/quit",
        "never asked",
    ]) + "\n"
    status, lines, err = chat(capsys, monkeypatch, model_dir, pairs[0], script)
    assert status == 0, err

    # the vision side ran once per pair, not once per question
    assert spies["vision_calls"] == 2
    # each turn's prompt is the conversation so far; /pair and /reset start a new one
    conversations = spies["conversations"]
    assert len(conversations) == 5
    first, count, where, other, after_reset = conversations
    assert first == [user("What changed?")]
    assert count[:-1] == [user("What changed?"), {"role": "assistant", "content": count[1]["content"]}]
    assert count[-1] == user(TASK_PROMPTS["count"])
    assert [m["role"] for m in where] == ["user", "assistant", "user", "assistant", "user"]
    assert other == [user("Anything new here?")]
    assert after_reset == [user("And now?")]

    # stdout: one answer per question, and a line per command
    assert lines[3].startswith("pair: ") and "new conversation" in lines[3]
    assert lines[5] == "conversation cleared" and lines[7] == f"saved {transcript}"
    assert len(lines) == 8

    saved = json.loads(transcript.read_text())["pairs"]
    assert [(p["before"], len(p["messages"])) for p in saved] == [(pairs[0][0], 6), (pairs[1][0], 2), (pairs[1][0], 2)]
    assert saved[0]["messages"][1]["content"] == lines[0] or lines[0] == "(empty answer)"


def test_prompt_is_rendered_by_the_chat_template(capsys, monkeypatch, model_dir, pairs):
    """The processor's chat template turns the history into the training format ("q ... a ... q ...")."""
    rendered = []
    from processing import DeltaVLMProcessor

    real_template = DeltaVLMProcessor.apply_chat_template

    def spy(self, conversation, *args, **kwargs):
        rendered.append(real_template(self, conversation, *args, **kwargs))
        return rendered[-1]

    monkeypatch.setattr(DeltaVLMProcessor, "apply_chat_template", spy)
    status, lines, _ = chat(capsys, monkeypatch, model_dir, pairs[0], "Is there a new road?\nWhere is it?\n")
    assert status == 0
    assert rendered[0] == "q is there a new road?"
    answer = lines[0] if lines[0] != "(empty answer)" else ""
    # the template's normalisation is normalize_text's (lowercase, `. ! " ( ) * # : ; ~` dropped)
    assert rendered[1] == normalize_text(f"q: Is there a new road? a: {answer}  q: Where is it?", max_words=None)


def test_bad_commands_keep_the_session(capsys, monkeypatch, model_dir, pairs, spies, tmp_path):
    script = "\n".join([
        f"/pair {tmp_path / 'nope.png'} {pairs[1][1]}",
        "/pair only_one.png",
        "/frobnicate",
        f"/save {tmp_path / 'no' / 'such' / 'dir.json'}",
        "/help",
        "Still there?",
    ]) + "\n"
    status, lines, _ = chat(capsys, monkeypatch, model_dir, pairs[0], script)
    assert status == 0
    assert "nope.png: no such file" in lines[0] and "not changed" in lines[0]
    assert lines[1].startswith("error: /pair takes two paths")
    assert lines[2].startswith("error: unknown command /frobnicate")
    assert lines[3].startswith("error: cannot write")
    assert lines[4].startswith("commands:")
    assert len(lines) == 6  # the question after the errors is answered, about the first pair
    assert spies["vision_calls"] == 1


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--before", "a.png"], "--after missing"),
        (["--before", "missing_a.png", "--after", "missing_b.png"], "missing_a.png: no such file"),
    ],
)
def test_startup_errors_are_one_line(capsys, model_dir, args, expected):
    status = deltavlm_cli.main(["chat", "--model", str(model_dir), *args])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and expected in err
