"""Does the focused tail read the cells better when the Q-Former trains too?

    python benchmarks/bench_tail_qformer.py CONFIG.yaml

CONFIG is a demo's tail config (`train-tail_config.yaml` of a `deltavlm demo --budget-minutes 30` or longer run)
with `model.encoder_learning_rate` set to the Q-Former's rate and `export.export_dir` / `training.output_dir`
pointed elsewhere. It runs `deltavlm train` on it with one change: after the paper's trainable set is switched
on, the ViT and the CSRM are frozen again, so the Q-Former and the query tokens train at
`encoder_learning_rate` while the vision side keeps what the warm-up taught it (the demo freezes all three).
Score the exported model with `deltavlm eval --task localization` and `--task count` against the demo's own
`eval/metrics.md`. docs/nano_experiments.md has what was measured (the whole encoder side trainable in the tail,
2026-11-27: worse on localization and building counts).
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train.run_train as run_train  # noqa: E402

VISION_SIDE = re.compile(r"(^|\.)(vision_model|difference_module)\.")  # peft prefixes the names


def freeze_vision_side(model) -> None:
    for name, param in model.named_parameters():
        if VISION_SIDE.search(name):
            param.requires_grad_(False)


def then_freeze_vision_side(step):
    """`step` (freeze_as_paper, apply_lora) switches the paper's trainable set on, ViT and CSRM included (apply_lora
    does it again after peft froze everything): freeze the vision side after it."""

    def wrapped(model, *args, **kwargs):
        result = step(model, *args, **kwargs)
        freeze_vision_side(result if isinstance(result, torch.nn.Module) else model)
        return result

    return wrapped


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    run_train.freeze_as_paper = then_freeze_vision_side(run_train.freeze_as_paper)
    run_train.apply_lora = then_freeze_vision_side(run_train.apply_lora)
    sys.exit(run_train.main(["--config", sys.argv[1]]))
