"""ChangeCap: the coco-caption metrics of remote-sensing change captioning as a local `evaluate` module.

    import evaluate
    changecap = evaluate.load("path/to/eval/metric_modules/changecap")   # no Hub access needed
    changecap.compute(predictions=["a road is built"], references=[["a new road is built", "..."]])

Thin wrapper over `eval.metrics.caption_scores` (pycocoevalcap's Bleu(4), Meteor, Rouge, Cider;
Cider is CIDEr-D), so `deltavlm score`, `deltavlm eval` and this module give the same numbers.
"""

import datasets
import evaluate

from eval.metrics import caption_scores

_DESCRIPTION = """Corpus-level BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D (all ×100) computed with the
coco-caption scorers of pycocoevalcap. protocol="standard" lowercases, replaces `.` and `?` by
spaces and splits on whitespace (the protocol of the published LEVIR-CC numbers); "authors"
follows the DeltaVLM authors' notebooks; "coco" tokenizes with coco-caption's PTB tokenizer (needs
`java`). METEOR needs `java`; without it METEOR is None and
`meteor_error` says why."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one caption per image pair.
    references: list of list of str, the reference captions of each pair.
    protocol: "standard" (default), "authors" or "coco".
    meteor: bool, False skips METEOR (it starts a JVM).
Returns:
    dict with num_samples, BLEU-1, BLEU-2, BLEU-3, BLEU-4, METEOR, ROUGE-L, CIDEr (and meteor_error).
"""

_CITATION = """@article{liu2022remote,
  title={Remote Sensing Image Change Captioning With Dual-Branch Transformers: A New Method and a Large Scale Dataset},
  author={Liu, Chenyang and Zhao, Rui and Chen, Hao and Zou, Zhengxia and Shi, Zhenwei},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  year={2022}, doi={10.1109/TGRS.2022.3218921}
}"""


class Changecap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references, protocol="standard", meteor=True):
        return caption_scores(list(predictions), [list(r) for r in references], protocol=protocol, meteor=meteor)
