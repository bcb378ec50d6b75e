"""`deltavlm chat`: a multi-turn dialogue about one pair of images in the terminal.

    deltavlm chat --before A --after B [--model M] [--num-beams 5] [--max-new-tokens 256] [--bands 3,2,1]

Reads one line per turn from stdin (a terminal or a script: `deltavlm chat ... < questions.txt`) and prints
the answer. The vision side (ViT + CSRM) runs once per pair (`model.get_pair_embeds`); every turn reuses its
`pair_embeds`, so only the Q-Former and the language model run per question. The prompt of each turn is the
whole conversation rendered with the processor's chat template, as the model was trained on dialogues.

Commands:
    /pair A B       switch to another pair (starts a new conversation)
    /caption /binary /count /localize   ask that ChangeChat task prompt
    /reset          forget the conversation, keep the pair
    /save FILE      write the transcript (every pair and its turns) as JSON
    /help           list the commands
    /quit           leave (end of input does too)
"""

import json
import shlex
import sys
from pathlib import Path

from eval.imagery import ImageryError, parse_bands, read_pair
from eval.predict import (
    TASKS,
    OneLineParser,
    PredictError,
    add_model_arguments,
    answer,
    encode_pairs,
    generation_settings,
    load_model,
    quiet_transformers,
    resolve_model,
    run_cli,
)

HELP = (
    "commands: /pair BEFORE AFTER, /caption, /binary, /count, /localize, /reset, /save FILE, /help, /quit; "
    "anything else is a question about the pair"
)


class ChatSession:
    """The state of a dialogue: the current pair, its pair_embeds (computed once) and the conversation.

    The transcript keeps every pair's conversation, including those left by /pair or /reset."""

    def __init__(self, model, processor, settings, prompt_format=None, bands=None):
        self.model, self.processor, self.settings = model, processor, settings
        self.prompt_format, self.bands = prompt_format, bands
        self.transcript: list[dict] = []  # [{"before", "after", "messages": [...]}, ...]
        self.pair_embeds = None

    @property
    def messages(self) -> list[dict]:
        return self.transcript[-1]["messages"]

    def set_pair(self, before: str, after: str, images=None) -> None:
        """Encode a pair (read from the paths unless `images` are given); on error the current pair stays."""
        images = images or read_pair(before, after, self.bands)
        self.pair_embeds = encode_pairs(self.model, self.processor, [images])
        self.transcript.append({"before": str(before), "after": str(after), "messages": []})

    def reset(self) -> None:
        """A new conversation about the same pair (its pair_embeds are kept)."""
        current = self.transcript[-1]
        if current["messages"]:
            self.transcript.append({"before": current["before"], "after": current["after"], "messages": []})

    def ask(self, question: str) -> str:
        conversation = [*self.messages, {"role": "user", "content": question}]
        reply = answer(self.model, self.processor, self.pair_embeds, [conversation], self.settings, self.prompt_format)[0]
        self.messages.extend([{"role": "user", "content": question}, {"role": "assistant", "content": reply}])
        return reply

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps({"pairs": self.transcript}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def handle_line(session: ChatSession, line: str, out) -> bool:
    """Act on one input line; returns False when the session should end. Errors are printed, never raised:
    a typo in a path must not end a dialogue."""
    text = line.strip()
    if not text:
        return True
    if not text.startswith("/"):
        print(session.ask(text) or "(empty answer)", file=out, flush=True)
        return True
    try:
        words = shlex.split(text)
    except ValueError as error:
        print(f"error: {error}", file=out, flush=True)
        return True
    command, arguments = words[0].lower(), words[1:]
    if command in ("/quit", "/exit"):
        return False
    if command == "/help":
        print(HELP, file=out, flush=True)
    elif command == "/reset":
        session.reset()
        print("conversation cleared", file=out, flush=True)
    elif command == "/pair":
        if len(arguments) != 2:
            print("error: /pair takes two paths: /pair BEFORE AFTER", file=out, flush=True)
            return True
        try:
            session.set_pair(*arguments)
            print(f"pair: {arguments[0]} -> {arguments[1]} (new conversation)", file=out, flush=True)
        except ImageryError as error:
            print(f"error: {error} (the pair was not changed)", file=out, flush=True)
    elif command == "/save":
        if len(arguments) != 1:
            print("error: /save takes one file name", file=out, flush=True)
            return True
        try:
            session.save(arguments[0])
            print(f"saved {arguments[0]}", file=out, flush=True)
        except OSError as error:
            print(f"error: cannot write {arguments[0]}: {error.strerror}", file=out, flush=True)
    elif command[1:] in TASKS:
        print(session.ask(TASKS[command[1:]]) or "(empty answer)", file=out, flush=True)
    else:
        print(f"error: unknown command {command}; {HELP}", file=out, flush=True)
    return True


def build_parser():
    parser = OneLineParser(prog="deltavlm chat", description="Multi-turn dialogue about a pair of images.")
    parser.add_argument("--before", help="the earlier image (A)")
    parser.add_argument("--after", help="the later image (B)")
    add_model_arguments(parser)
    return parser


def main(argv=None) -> int:
    return run_cli("deltavlm chat", run, build_parser().parse_args(argv))


def run(args) -> int:
    if not args.before or not args.after:
        missing = " and ".join(name for name, value in (("--before", args.before), ("--after", args.after)) if not value)
        raise PredictError(f"{missing} missing: a dialogue is about a pair of images")
    bands = parse_bands(args.bands)
    model_path = resolve_model(args.model)
    settings = generation_settings(args, model_path)
    images = read_pair(args.before, args.after, bands)  # before the model load: a bad path fails in a second
    quiet_transformers()
    model, processor = load_model(model_path, args.device)
    session = ChatSession(model, processor, settings, args.prompt_format, bands)
    session.set_pair(args.before, args.after, images)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, flush=True)
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or not handle_line(session, line, sys.stdout):  # end of input, or /quit
                return 0
    except KeyboardInterrupt:
        return 130


__all__ = ["ChatSession", "handle_line", "main"]
