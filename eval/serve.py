"""`deltavlm serve`: a local web app (Gradio) for change analysis of image pairs.

    deltavlm serve [--model M] [--host 127.0.0.1] [--port 7860] [--max-upload-mb 20] [--examples DIR]
                   [--num-beams 5] [--max-new-tokens 256] [--bands 3,2,1]

Upload a before and an after image (PNG, JPEG, 16-bit or multi-band TIFF) or pick a pair from --examples (a
folder with A/ and B/ subfolders); the app shows them under a before/after slider beside the change map, and
answers the ChangeChat task prompts (one click each) and follow-up questions in a chat. The vision side runs
once per pair; questions reuse it.

Nothing leaves the machine: the app binds to 127.0.0.1 unless --host says otherwise, Gradio's analytics and
Hugging Face telemetry are switched off, no share link is made, and the theme's fonts are local. Uploads above
--max-upload-mb are refused. Errors (an unreadable file, a tiny image) show as a message; the app keeps running.
"""

import math
import os
import sys
import warnings
from pathlib import Path

from processing.conversation import TASK_PROMPTS

from eval.imagery import ImageryError, parse_bands, read_pair
from eval.predict import (
    IMAGE_SUFFIXES,
    OneLineParser,
    PredictError,
    add_model_arguments,
    answer,
    generation_settings,
    load_model,
    quiet_transformers,
    resolve_model,
)

# The buttons above the chat: label -> ChangeChat prompt.
TASK_BUTTONS = {
    "Describe the changes": TASK_PROMPTS["caption"],
    "Changed? (yes/no)": TASK_PROMPTS["binary"],
    "Count roads & buildings": TASK_PROMPTS["count"],
    "Locate (3x3 grid)": TASK_PROMPTS["localization"],
}
UPLOAD_TYPES = list(IMAGE_SUFFIXES)


def keep_everything_local() -> None:
    """Before gradio is imported: no usage analytics, no version check, no Hub telemetry."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


class PairAnalyst:
    """What the app's callbacks need: the model, the settings, and how to turn files into a pair and answers.
    Each method returns values for the UI and a status message, and never raises for bad input."""

    def __init__(self, model, processor, settings, prompt_format=None, bands=None, max_upload_mb=20.0,
                 examples: Path | None = None):
        self.model, self.processor, self.settings = model, processor, settings
        self.prompt_format, self.bands = prompt_format, bands
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.examples = examples

    def example_names(self) -> list[str]:
        if self.examples is None:
            return []
        return sorted(
            path.name for path in (self.examples / "A").iterdir()
            if path.suffix.lower() in IMAGE_SUFFIXES and (self.examples / "B" / path.name).is_file()
        )

    def load_pair(self, before_path, after_path):
        """-> (slider images or None, change-map overlay or None, pair state or None, status text)."""
        from eval.change_map import change_map, overlay

        if not before_path or not after_path:
            missing = "before" if not before_path else "after"
            return None, None, None, f"Add the {missing} image too."
        try:
            for path in (before_path, after_path):
                # Gradio refuses larger uploads already; this also covers files picked from --examples
                if os.path.isfile(path) and os.path.getsize(path) > self.max_upload_bytes:
                    raise ImageryError(f"{Path(path).name} is larger than {self.max_upload_bytes / 2**20:g} MB")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                before, after = read_pair(before_path, after_path, self.bands)
            pair_embeds, heat = change_map(self.model, self.processor, before, after)
        except ImageryError as error:
            return None, None, None, f"Error: {_file_names(error)}"
        except Exception as error:  # a web app must survive anything a file can do to a decoder or the model
            return None, None, None, f"Error: could not analyse this pair ({type(error).__name__}: {error})"
        if after.size != before.size:
            after = after.resize(before.size)  # the slider needs one size; the model resizes both anyway
        notes = " ".join(f"Note: {_file_names(w.message)}." for w in caught)
        state = {"before": str(before_path), "after": str(after_path), "pair_embeds": pair_embeds, "messages": []}
        names = f"{Path(before_path).name} -> {Path(after_path).name}"
        status = f"Pair loaded: {names} ({before.width}x{before.height}). Ask a question or click a task. {notes}".strip()
        return (before, after), overlay(after, heat), state, status

    def ask(self, question: str, pair):
        """-> (chat messages to show, pair state, status). The prompt is the pair's whole conversation, rendered
        by the chat template; the conversation lives in the pair state (the chat box only shows it)."""
        question = (question or "").strip()
        if pair is None:
            return [], None, "Load a pair first (upload both images or pick an example)."
        shown = _shown(pair["messages"])
        if not question:
            return shown, pair, "Type a question or click a task."
        conversation = [*pair["messages"], {"role": "user", "content": question}]
        try:
            reply = answer(self.model, self.processor, pair["pair_embeds"], [conversation], self.settings,
                           self.prompt_format)[0]
        except Exception as error:  # keep the app up; say what failed
            return shown, pair, f"Error: the model failed on this question ({type(error).__name__}: {error})"
        pair = {**pair, "messages": [*conversation, {"role": "assistant", "content": reply}]}
        return _shown(pair["messages"]), pair, "Answered."

    @staticmethod
    def reset(pair):
        """A new conversation about the same pair (its vision side is kept)."""
        return None if pair is None else {**pair, "messages": []}


def _shown(messages: list[dict]) -> list[dict]:
    """The conversation for the chat box: an empty answer is shown as such rather than as an empty bubble."""
    return [{**m, "content": m["content"] or "(empty answer)"} for m in messages]


def _file_names(message) -> str:
    """Gradio stores uploads under long temporary paths; show the file's name only."""
    text = str(message)
    for word in text.split():
        path = word.rstrip(":,;")
        if os.sep in path and Path(path).name:
            text = text.replace(path, Path(path).name)
    return text


def build_app(analyst: PairAnalyst):
    import gradio as gr

    with gr.Blocks(title="DeltaVLM change analysis", analytics_enabled=False) as app:
        gr.Markdown("## DeltaVLM: change analysis of a before/after image pair\nRuns on this machine only.")
        state = gr.State(None)
        with gr.Row():
            before_file = gr.File(label="Before (A)", file_types=UPLOAD_TYPES, elem_id="before-file")
            after_file = gr.File(label="After (B)", file_types=UPLOAD_TYPES, elem_id="after-file")
            example = gr.Dropdown(choices=analyst.example_names(), label="or pick an example pair", value=None,
                                  interactive=True, visible=analyst.examples is not None, elem_id="example")
        status = gr.Markdown("Upload a before and an after image.", elem_id="status")
        with gr.Row():
            slider = gr.ImageSlider(label="Before / after", type="pil", format="png", height=360, elem_id="slider")
            heat = gr.Image(label="Change map (where the difference module sees change)", type="pil", format="png",
                            interactive=False, height=360, elem_id="change-map")
        with gr.Row():
            task_buttons = [gr.Button(label, elem_classes=["task"]) for label in TASK_BUTTONS]
        chat = gr.Chatbot(label="Dialogue", elem_id="chat", height=320)
        with gr.Row():
            question = gr.Textbox(placeholder="Ask a follow-up question and press Enter", show_label=False,
                                  elem_id="question", scale=5)
            send = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
            reset = gr.Button("New conversation", scale=1, elem_id="reset")

        def on_files(before_path, after_path):
            images, overlay_image, pair, message = analyst.load_pair(before_path, after_path)
            # an upload replaces any picked example: the dropdown must not name a pair that is not shown
            return images, overlay_image, pair, [], message, None

        def on_example(selected: gr.SelectData):
            name = selected.value
            if name not in analyst.example_names():  # only names from the list: never a path from the client
                return gr.update(), gr.update(), None, None, None, [], "Pick an example from the list."
            before_path, after_path = str(analyst.examples / "A" / name), str(analyst.examples / "B" / name)
            return (before_path, after_path, *on_files(before_path, after_path)[:-1])

        def on_question(text, pair):
            shown, pair, message = analyst.ask(text, pair)
            return shown, pair, message, ""

        pair_outputs = [slider, heat, state, chat, status]
        # One queue for every model call: the callbacks share one model.
        model_queue = dict(concurrency_id="model", concurrency_limit=1)
        for file_box in (before_file, after_file):
            file_box.upload(on_files, [before_file, after_file], [*pair_outputs, example], **model_queue)
            file_box.clear(on_files, [before_file, after_file], [*pair_outputs, example], **model_queue)
        # select, not change: it fires on the user's pick only, not when an upload resets the dropdown
        example.select(on_example, None, [before_file, after_file, *pair_outputs], **model_queue)
        answer_outputs = [chat, state, status, question]
        for button, prompt in zip(task_buttons, TASK_BUTTONS.values()):
            button.click(lambda pair, text=prompt: on_question(text, pair), [state], answer_outputs, **model_queue)
        for trigger in (question.submit, send.click):
            trigger(on_question, [question, state], answer_outputs, **model_queue)
        for trigger in (reset.click, chat.clear):
            trigger(lambda pair: ([], analyst.reset(pair), "New conversation about the same pair."), [state],
                    [chat, state, status])
    return app


def build_parser():
    parser = OneLineParser(prog="deltavlm serve", description="Local web app for change analysis of image pairs.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the app to the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default 20 MB)")
    parser.add_argument("--examples", help="folder with A/ and B/ subfolders of same-named pairs to pick from")
    add_model_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (PredictError, ImageryError) as error:
        print(f"deltavlm serve: error: {error}", file=sys.stderr)
        return 2


def run(args) -> int:
    keep_everything_local()
    examples = Path(args.examples).resolve() if args.examples else None
    if examples is not None and not ((examples / "A").is_dir() and (examples / "B").is_dir()):
        raise PredictError(f"--examples {args.examples}: expected subfolders A/ (before) and B/ (after)")
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        raise PredictError(f"--max-upload-mb must be a positive number, got {args.max_upload_mb}")
    if not 0 <= args.port <= 65535:  # before the model loads, not when the server binds
        raise PredictError(f"--port must lie in 0..65535, got {args.port}")
    bands = parse_bands(args.bands)
    model_path = resolve_model(args.model)
    settings = generation_settings(args, model_path)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise PredictError("the web app needs gradio: pip install gradio") from None
    quiet_transformers()
    model, processor = load_model(model_path, args.device)
    analyst = PairAnalyst(model, processor, settings, args.prompt_format, bands, args.max_upload_mb, examples)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"deltavlm serve: warning: binding {args.host}: the app is reachable from other machines", file=sys.stderr)
    print(f"DeltaVLM app on http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}", flush=True)
    build_app(analyst).queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        max_file_size=analyst.max_upload_bytes,
        allowed_paths=[str(examples)] if examples else None,
        ssr_mode=False,  # no Node server: one process, nothing else listening
        quiet=True,
    )
    return 0


__all__ = ["PairAnalyst", "build_app", "keep_everything_local", "main"]
