"""`deltavlm serve`: the app's callbacks on good and bad input (in-process), the command's error lines, and the
real app in a headless browser (Debian's chromium driven by Playwright) against `deltavlm serve` on localhost.

Images are synthetic pairs from `train.synthetic` (never LEVIR-CC images: a screenshot of this test is the
README's picture). Set DELTAVLM_SERVE_SCREENSHOT=docs/serve.png to write the screenshot there too."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import deltavlm_cli
from processing.conversation import TASK_PROMPTS

from eval.generation import GenerationSettings
from eval.imagery import read_pair
from eval.predict import answer, encode_pairs, load_model

pytest.importorskip("gradio")
from eval.serve import PairAnalyst, build_app  # noqa: E402  (needs gradio)

CHROMIUM = "/usr/bin/chromium"
SETTINGS = GenerationSettings(num_beams=1, max_new_tokens=6)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def analyst(model_dir):
    model, processor = load_model(str(model_dir), "cpu")
    return PairAnalyst(model, processor, SETTINGS)


@pytest.fixture(scope="module")
def synthetic_pairs(tmp_path_factory):
    """Two synthetic changed pairs (256 px) as files: {name: (before, after)}, in an A/ B/ folder."""
    from train.synthetic.dataset import generate_pair

    folder = tmp_path_factory.mktemp("pairs")
    pairs = {}
    for name, seed in (("village.png", 3), ("crossing.png", 7)):
        pair = generate_pair(seed, size=256, change_probability=1.0)
        paths = []
        for side, image in (("A", pair.image_a), ("B", pair.image_b)):
            (folder / side).mkdir(exist_ok=True)
            Image.fromarray(image).save(folder / side / name)
            paths.append(str(folder / side / name))
        pairs[name] = tuple(paths)
    return folder, pairs


def write_bad_files(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(folder / "tiny.png")
    return {"corrupt": str(folder / "corrupt.png"), "tiny": str(folder / "tiny.png")}


# ---------------------------------------------------------------------------------------------
# the callbacks

def test_load_pair_then_a_dialogue(analyst, synthetic_pairs):
    before, after = synthetic_pairs[1]["village.png"]
    images, overlay_image, pair, status = analyst.load_pair(before, after)
    assert status.startswith("Pair loaded: village.png -> village.png (256x256)")
    assert [image.size for image in images] == [(256, 256), (256, 256)] and overlay_image.size == (256, 256)
    assert pair["pair_embeds"].shape[0] == 1 and pair["messages"] == []

    shown, pair, status = analyst.ask(TASK_PROMPTS["caption"], pair)
    assert status == "Answered." and [m["role"] for m in shown] == ["user", "assistant"]
    first_answer = pair["messages"][1]["content"]
    expected = answer(analyst.model, analyst.processor, pair["pair_embeds"],
                      [[{"role": "user", "content": TASK_PROMPTS["caption"]}]], SETTINGS)[0]
    assert first_answer == expected

    shown, pair, _ = analyst.ask("Where?", pair)  # the follow-up sees the first round
    assert [m["content"] for m in pair["messages"][:3]] == [TASK_PROMPTS["caption"], first_answer, "Where?"]
    assert len(shown) == 4
    assert analyst.reset(pair)["messages"] == [] and analyst.reset(None) is None


def test_bad_input_gives_a_message_not_an_exception(analyst, synthetic_pairs, tmp_path):
    before, after = synthetic_pairs[1]["village.png"]
    bad = write_bad_files(tmp_path)
    cases = [
        ((before, None), "Add the after image"),
        ((None, after), "Add the before image"),
        ((before, bad["corrupt"]), "corrupt.png: cannot read"),
        ((bad["tiny"], after), "tiny.png: 10x10 pixels is too small"),
        ((before, str(tmp_path / "gone.png")), "gone.png"),
    ]
    for (first, second), expected in cases:
        images, overlay_image, pair, status = analyst.load_pair(first, second)
        assert images is None and overlay_image is None and pair is None
        assert expected in status, status
        assert str(tmp_path) not in status  # file names only, not temporary folders
    assert analyst.ask("What changed?", None)[2].startswith("Load a pair first")


def test_upload_size_limit(model_dir, analyst, synthetic_pairs):
    small = PairAnalyst(analyst.model, analyst.processor, SETTINGS, max_upload_mb=0.01)
    _, _, pair, status = small.load_pair(*synthetic_pairs[1]["village.png"])
    assert pair is None and "larger than" in status


def test_the_app_builds(analyst, synthetic_pairs):
    import gradio as gr

    with_examples = PairAnalyst(analyst.model, analyst.processor, SETTINGS, examples=synthetic_pairs[0])
    assert with_examples.example_names() == ["crossing.png", "village.png"]
    assert isinstance(build_app(with_examples), gr.Blocks)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "/nonexistent/model"], "not a DeltaVLM model folder"),
        (["--examples", "/nonexistent"], "expected subfolders A/"),
        (["--max-upload-mb", "0"], "must be a positive number"),
        (["--max-upload-mb", "nan"], "must be a positive number"),
        (["--port", "70000"], "--port must lie in 0..65535"),
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
    ],
)
def test_command_errors_are_one_line(capsys, model_dir, args, expected):
    full = ["serve", *(["--model", str(model_dir)] if "--model" not in args else []), *args]
    assert deltavlm_cli.main(full) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err


# ---------------------------------------------------------------------------------------------
# the real app in a browser

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"deltavlm serve exited with {process.returncode}: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"deltavlm serve did not answer on {url} within {timeout} s")


@pytest.fixture
def server(model_dir, synthetic_pairs):
    port = free_port()
    command = [sys.executable, "-m", "deltavlm_cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--examples", str(synthetic_pairs[0]), "--num-beams", "1", "--max-new-tokens", "6"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def expected_answers(model_dir, before, after, questions):
    """What the app should answer: the same model and settings, the dialogue replayed here."""
    model, processor = load_model(str(model_dir), "cpu")
    pair_embeds = encode_pairs(model, processor, [read_pair(before, after)])
    messages, answers = [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        reply = answer(model, processor, pair_embeds, [messages], SETTINGS)[0]
        messages.append({"role": "assistant", "content": reply})
        answers.append(reply or "(empty answer)")
    return answers


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")
def test_the_app_in_a_browser(server, model_dir, synthetic_pairs, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    folder, pairs = synthetic_pairs
    bad = write_bad_files(tmp_path / "bad")
    outside = []  # every request that is not to the app itself: must stay empty

    def status_contains(page, text, timeout=60_000):
        page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text, timeout=timeout)

    def set_file(page, box, path):
        """A file box holding a file shows it with a clear button instead of the file input: clear it first."""
        clear = page.locator(f"{box} button[aria-label='Clear']")
        if clear.count():
            clear.first.click()
        page.set_input_files(f"{box} input[type=file]", path)

    def upload(page, before, after):
        set_file(page, "#before-file", before)
        set_file(page, "#after-file", after)

    def wait_for_chat(page, text):
        """Fails (timeout) if the answer never appears in the chat."""
        page.wait_for_function("t => document.querySelector('#chat').innerText.includes(t)", arg=text, timeout=60_000)

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("request", lambda request: None if request.url.startswith(server) else outside.append(request.url))
            page.goto(server)
            page.wait_for_selector("#before-file input[type=file]", state="attached", timeout=60_000)

            # pair 1: upload, one-click task, follow-up question
            village = pairs["village.png"]
            caption, follow_up = expected_answers(model_dir, *village, [TASK_PROMPTS["caption"], "Where are they?"])
            upload(page, *village)
            status_contains(page, "Pair loaded: village.png -> village.png")
            page.get_by_role("button", name="Describe the changes").click()
            wait_for_chat(page, caption)
            page.fill("#question textarea", "Where are they?")
            page.press("#question textarea", "Enter")
            status_contains(page, "Answered")
            wait_for_chat(page, "Where are they?")
            wait_for_chat(page, follow_up)

            # a corrupt upload: a message, and the app keeps working
            set_file(page, "#after-file", bad["corrupt"])
            status_contains(page, "Error: corrupt.png: cannot read")

            # pair 2: a new upload starts a new conversation
            crossing = pairs["crossing.png"]
            binary, where = expected_answers(model_dir, *crossing, [TASK_PROMPTS["binary"], "What changed near the road?"])
            upload(page, *crossing)
            status_contains(page, "Pair loaded: crossing.png -> crossing.png")
            assert "Where are they?" not in page.inner_text("#chat")
            page.get_by_role("button", name="Changed? (yes/no)").click()
            wait_for_chat(page, binary)
            page.fill("#question textarea", "What changed near the road?")
            page.get_by_role("button", name="Ask", exact=True).click()
            wait_for_chat(page, where)
            status_contains(page, "Answered")

            # picking an example pair fills both file boxes and loads it
            page.click("#example input")
            page.get_by_role("option", name="village.png").click()
            status_contains(page, "Pair loaded: village.png -> village.png")
            assert "village" in page.inner_text("#before-file") and "village" in page.inner_text("#after-file")
            assert page.inner_text("#chat").strip() in ("", "Dialogue")
            page.get_by_role("button", name="Count roads & buildings").click()
            wait_for_chat(page, expected_answers(model_dir, *village, [TASK_PROMPTS["count"]])[0])
            status_contains(page, "Answered")
            # back to an uploaded pair (for the picture); the dropdown no longer names an example
            upload(page, *crossing)
            status_contains(page, "Pair loaded: crossing.png -> crossing.png")
            assert "village" not in page.inner_text("#example")
            page.get_by_role("button", name="Changed? (yes/no)").click()
            wait_for_chat(page, binary)
            page.fill("#question textarea", "What changed near the road?")
            page.press("#question textarea", "Enter")
            wait_for_chat(page, where)

            screenshot = tmp_path / "serve.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
            if os.environ.get("DELTAVLM_SERVE_SCREENSHOT"):
                shutil.copyfile(screenshot, os.environ["DELTAVLM_SERVE_SCREENSHOT"])
        finally:
            browser.close()
    assert outside == [], f"the page reached outside the app: {outside}"
