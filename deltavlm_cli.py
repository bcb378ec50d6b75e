"""`deltavlm` command line: one subcommand per job, each a `main(argv)` in the package that owns it.

The dispatcher imports a subcommand's module only when it runs, so `deltavlm score` does not pay
for torch and `deltavlm --help` is instant.
"""

import os
import sys


def _synth(argv):
    from train.synthetic import main

    return main(argv)


def _train(argv):
    from train.run_train import main

    return main(argv)


def _demo(argv):
    from train.demo import main

    return main(argv)


def _score(argv):
    from eval.score import main

    return main(argv)


def _eval(argv):
    from eval.run_eval import main

    return main(argv)


def _convert(argv):
    from modeling_deltavlm.convert_original_checkpoint import main

    return main(argv)


def _predict(argv):
    from eval.predict import main

    return main(argv)


def _chat(argv):
    from eval.chat import main

    return main(argv)


def _serve(argv):
    from eval.serve import main

    return main(argv)


COMMANDS = {
    "demo": (_demo, "generate synthetic data, train DeltaVLM-Nano, evaluate it and ask it questions"),
    "synth": (_synth, "generate a synthetic bi-temporal change data set (LEVIR-CC / ChangeChat layout)"),
    "train": (_train, "fine-tune DeltaVLM with the HF Trainer (YAML config + overrides)"),
    "eval": (_eval, "run a model on ChangeChat / LEVIR-CC test files and score all six tasks"),
    "score": (_score, "score a prediction file against references (no model needed)"),
    "convert": (_convert, "convert the authors' checkpoint_best.pth into a HF model folder"),
    "predict": (_predict, "answer a prompt about one pair of images (or a batch of pairs)"),
    "chat": (_chat, "multi-turn dialogue about one pair in the terminal"),
    "serve": (_serve, "local web app (Gradio) on 127.0.0.1"),
}


def _usage() -> str:
    lines = ["usage: deltavlm <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `deltavlm <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"deltavlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        result = COMMANDS[name][0](rest)
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as error:
        # Commands report bad input by raising these before spending compute; the user gets one line, not a
        # traceback. (Bugs raise other exceptions and keep theirs.) DELTAVLM_DEBUG=1 shows the traceback.
        if os.environ.get("DELTAVLM_DEBUG"):
            raise
        print(f"deltavlm {name}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
