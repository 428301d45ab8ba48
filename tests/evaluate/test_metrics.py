"""Metrics against hand-computed values and against pycocoevalcap run directly on COCO files."""

import json

import pytest
import torch

from uniperceiver_cli.evaluate.metrics import (
    average_views,
    caption_metrics,
    mlm_accuracy,
    retrieval_recall,
    topk_accuracy,
)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5], [0.3, 0.2, 0.1]])
    labels = torch.tensor([1, 2, 0, 2])
    # top-1 hits: row 0; top-2 adds row 1 (0.3 is second); rows 2 and 3 need all three
    result = topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert result == {"acc@1": 25.0, "acc@2": 50.0, "acc@3": 100.0}


def test_average_views_is_per_video_mean():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8], [0.4, 0.6], [0.0, 1.0]])
    torch.testing.assert_close(average_views(probs, 3), torch.tensor([[0.5, 0.5], [0.2, 0.8]]))


def test_retrieval_recall_with_ties_and_several_ground_truths():
    # 3 items, 5 texts: texts 0,1 -> item 0; 2,3 -> item 1; 4 -> item 2
    text_to_item = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor([
        [0.1, 0.9, 0.5, 0.2, 0.0],  # item 0: best own text (0.9) is first -> rank 0
        [0.7, 0.1, 0.3, 0.7, 0.2],  # item 1: best own 0.7 ties with wrong text 0 (0.7) -> rank 1
        [0.9, 0.8, 0.7, 0.6, 0.5],  # item 2: own text is last -> rank 4
    ])
    r = retrieval_recall(sim, text_to_item, ks=(1, 2, 5))
    assert r["i2t_R@1"] == pytest.approx(100 / 3)
    assert r["i2t_R@2"] == pytest.approx(200 / 3)
    assert r["i2t_R@5"] == 100.0
    # t2i, column by column: t0 -> items (0.1, 0.7, 0.9), own item 0 ranks 2; t1: 0.9 first -> 0;
    # t2: own 0.3, item 2 has 0.7 and item 0 0.5 -> 2; t3: own 0.7 first -> 0; t4: own 0.5, 0.0 and 0.2 below -> 0
    assert r["t2i_R@1"] == pytest.approx(60.0)
    assert r["t2i_R@2"] == pytest.approx(60.0)
    assert r["t2i_R@5"] == 100.0
    assert r["i2t_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)
    assert r["mean"] == pytest.approx((r["i2t_mean"] + r["t2i_mean"]) / 2)
    with pytest.raises(ValueError, match="at least one text"):
        retrieval_recall(sim[:, :4], torch.tensor([0, 0, 1, 1]))


def test_mlm_accuracy():
    assert mlm_accuracy(torch.tensor([1, 0, 0]), torch.tensor([1, 1, 0])) == pytest.approx(200 / 3)


def test_caption_metrics_by_hand_and_against_cocoevalcap(tmp_path, monkeypatch):
    refs = {1: ["a red circle on the left", "a small red circle"], 2: ["a blue square above a star"],
            3: ["two green stars", "green stars side by side"]}
    preds = {1: "a red circle on the left", 2: "a blue square", 3: "three yellow hearts"}
    ours = caption_metrics(preds, refs)
    perfect = caption_metrics({1: refs[1][0]}, {1: refs[1]})
    assert perfect["BLEU-1"] == pytest.approx(100.0) and perfect["ROUGE-L"] == pytest.approx(100.0)

    # pycocoevalcap's own entry point on COCO files; SPICE replaced because it needs a download.
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    annotations = {"images": [{"id": i} for i in refs], "type": "captions", "info": {}, "licenses": [],
                   "annotations": [{"image_id": i, "id": 10 * i + j, "caption": c}
                                   for i, caps in refs.items() for j, c in enumerate(caps)]}
    (tmp_path / "gt.json").write_text(json.dumps(annotations))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in preds.items()]))
    coco = COCO(str(tmp_path / "gt.json"))
    evaluator = coco_eval.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    evaluator.params["image_id"] = evaluator.cocoRes.getImgIds()
    evaluator.evaluate()
    names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
             "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
    for theirs, name in names.items():
        assert ours[name] == pytest.approx(100.0 * evaluator.eval[theirs], abs=1e-9), name
