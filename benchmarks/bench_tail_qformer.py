"""Does the focused tail read the cells better when the Q-Former trains too?

    python benchmarks/bench_tail_qformer.py CONFIG.yaml

CONFIG is a demo's tail config (`train-tail_config.yaml` of a `deltavlm demo --budget-minutes 30` or longer run)
with `model.encoder_learning_rate` set to the Q-Former's rate and `export.export_dir` / `training.output_dir`
pointed elsewhere. It runs `deltavlm train` on it with one change: after the paper's trainable set is switched
on, the ViT and the CSRM are frozen again, so the Q-Former and the query tokens train at
`encoder_learning_rate` while the vision side keeps what the warm-up taught it (the demo freezes all three).
Score the exported model with `deltavlm eval --task localization` and `--task count` against the demo's own
`eval/metrics.md`. Result (2026-11-27) in docs/nano_experiments.md: it did not help.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train.run_train as run_train  # noqa: E402

_freeze_as_paper = run_train.freeze_as_paper


def freeze_as_paper_but_vision(model):
    counts = _freeze_as_paper(model)
    for name, param in model.named_parameters():
        if name.startswith(("vision_model.", "difference_module.")):
            param.requires_grad_(False)
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    run_train.freeze_as_paper = freeze_as_paper_but_vision
    sys.exit(run_train.main(["--config", sys.argv[1]]))
