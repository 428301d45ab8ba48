"""prepare-data vqa: the official VQA v2 files (and Visual Genome QA) into one sample per question, with the answer
vocabulary built from the annotations (or given), the official soft scores as targets, skips counted by reason, a
held-out minival split, and layout errors in one line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tests.data.test_sources import GARBAGE, fails, jpeg, meta, prepare, put, read_split
from uniperceiver_cli.data import loader
from uniperceiver_cli.data.shards import Manifest
from uniperceiver_cli.data.sources import vqa

ANNOTATED = {  # question_id -> image_id, question, the 10 human answers, multiple_choice_answer
    "train2014": {
        101: (1, "What color is the bus?", ["blue"] * 3 + ["green"] * 7, "green"),
        102: (1, "How many dogs?", ["2"] * 10, "2"),
        103: (2, "Is it raining?", ["yes"] * 10, "yes"),
        104: (2, "What  color is\tthe plate? ", ["blue"] * 10, "blue"),
        105: (3, "Is this a cat?", ["yes"] * 10, "yes"),  # image 3 is corrupt
    },
    "val2014": {
        201: (10, "What color is the car?", ["blue"] * 9 + ["yes"], "blue"),
        202: (10, "Is it sunny?", ["yes"] * 10, "yes"),
        203: (12, "How many cars?", ["two"] * 10, "two"),  # "two" counts as "2", in the vocabulary and the scores
        204: (10, "What animal is it?", ["giraffe"] * 10, "giraffe"),
        205: (11, "What is it?", ["zebra"] * 10, "zebra"),  # image 11 is missing
    },
}
UNANNOTATED = {"train2014": {106: 1}}  # question_id -> image_id
# min count 2: yes 3 times (103, 105, 202), then 2 (102, 203) and blue (104, 201) twice, alphabetically.
VOCABULARY = ["yes", "2", "blue"]
TARGETS = {101: [[2, 0.9]], 102: [[1, 1.0]], 103: [[0, 1.0]], 104: [[2, 1.0]],  # 3 of 10 said blue: 0.9
           201: [[0, 0.3], [2, 1.0]], 202: [[0, 1.0]], 203: [[1, 1.0]],  # one said yes: 0.3
           204: []}  # giraffe is not in the vocabulary
IMAGE_SEEDS = {1: 1, 2: 2, 10: 10, 12: 12}


def _layout(root: Path) -> tuple[Path, Path]:
    """The official files of train2014 and val2014, a questions-only test2015, and the COCO images (image 1 in its
    split folder, the others flat; 3 corrupt, 11 missing)."""
    source, images = root / "vqa", root / "coco"
    for split, questions in ANNOTATED.items():
        extra = UNANNOTATED.get(split, {})
        records = [{"question_id": qid, "image_id": image, "question": text} for qid, (image, text, _, _)
                   in questions.items()] + [{"question_id": qid, "image_id": image, "question": "Who is there?"}
                                             for qid, image in extra.items()]
        put(source / vqa.QUESTIONS.format(split), json.dumps({"questions": records, "data_subtype": split}))
        annotations = [{"question_id": qid, "image_id": image, "multiple_choice_answer": answer,
                        "answer_type": "other", "question_type": text.split()[0].lower(),
                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                    for i, a in enumerate(humans)]}
                       for qid, (image, text, humans, answer) in questions.items()]
        put(source / vqa.ANNOTATIONS.format(split), json.dumps({"annotations": annotations}))
    put(source / vqa.QUESTIONS.format("test2015"), json.dumps({"questions": []}))
    put(images / "train2014" / "COCO_train2014_000000000001.jpg", jpeg(1))
    put(images / "COCO_train2014_000000000002.jpg", jpeg(2))
    put(images / "COCO_train2014_000000000003.jpg", GARBAGE)
    put(images / "COCO_val2014_000000000010.jpg", jpeg(10))
    put(images / "COCO_val2014_000000000012.jpg", jpeg(12))
    return source, images


def _targets(sample: dict[str, bytes]) -> list[list[float]]:
    return [[index, round(score, 9)] for index, score in meta(sample)["targets"]]


def test_vqa_splits_vocabulary_targets_and_skips(tmp_path):
    source, images = _layout(tmp_path)
    out = tmp_path / "out"
    result = prepare("vqa", source, "--images", images, "--out", out, "--min-answer-count", "2", "--min-shards", "2",
                     "--workers", "2")
    assert "missing annotation" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["answers.txt", "train2014", "val2014"]  # no test2015
    assert (out / "answers.txt").read_text() == "yes\n2\nblue\n"
    skipped = {"train2014": {"missing annotation": 1, "undecodable image": 1}, "val2014": {"missing file": 1}}
    for split, questions in ANNOTATED.items():
        manifest, samples = read_split(out / split)
        assert manifest.classes == VOCABULARY and manifest.tasks == ["vqa"] and manifest.modality == "image"
        assert manifest.skipped == skipped[split]
        assert manifest.extra == {"questions": len(questions) + len(UNANNOTATED.get(split, {})),
                                  "answer_vocabulary": "built from train2014, val2014 (min count 2)"}
        assert list(samples) == [f"q{qid}" for qid in questions if qid in TARGETS]  # file order
        for key, sample in samples.items():
            qid = int(key[1:])
            image, text, humans, _ = questions[qid]
            assert sample["jpg"] == jpeg(IMAGE_SEEDS[image]) and sample["txt"].decode() == " ".join(text.split())
            assert _targets(sample) == TARGETS[qid]
            assert {k: v for k, v in meta(sample).items() if k != "targets"} == {
                "id": qid, "image_id": image, "question": " ".join(text.split()), "answers": humans,
                "answer_type": "other", "question_type": text.split()[0].lower()}
    shards = [loader.Shard(path) for path in Manifest.load(out / "train2014").shard_paths(out / "train2014")]
    raw = {sample["__key__"]: sample for sample in loader.read_shards(shards, Counter())}
    assert raw["q101"]["jpg"] == jpeg(1) and raw["q104"]["jpg"] == jpeg(2)  # the bytes unchanged
    assert raw["q104"]["txt"] == b"What color is the plate?"


def test_vqa_given_answers_hold_out_and_split_selection(tmp_path):
    source, images = _layout(tmp_path)
    answers = put(tmp_path / "answers.txt", "blue\nyes\ngiraffe\n")
    out = tmp_path / "out"
    prepare("vqa", source, "--images", images, "--out", out, "--answers", answers, "--split", "val2014",
            "--hold-out", "2")
    assert sorted(p.name for p in out.iterdir()) == ["answers.txt", "minival", "val2014"]
    assert (out / "answers.txt").read_text() == answers.read_text()
    manifest, samples = read_split(out / "val2014")
    assert manifest.classes == ["blue", "yes", "giraffe"] and manifest.extra["answer_vocabulary"] == str(answers)
    assert manifest.skipped == {} and manifest.extra["questions"] == 3
    assert {k: _targets(s) for k, s in samples.items()} == {"q201": [[0, 1.0], [1, 0.3]], "q202": [[1, 1.0]],
                                                            "q203": []}
    manifest, samples = read_split(out / "minival")  # val's last 2 questions
    assert manifest.classes == ["blue", "yes", "giraffe"] and manifest.skipped == {"missing file": 1}
    assert {k: _targets(s) for k, s in samples.items()} == {"q204": [[2, 1.0]]}

    fails(prepare("vqa", source, "--images", images, "--out", out, "--split", "train2014", "--min-answer-count", "1",
                  code=2), "answers.txt holds another answer set", f"--answers {out / 'answers.txt'}")
    fails(prepare("vqa", source, "--images", images, "--out", tmp_path / "x", "--answers", answers, "--split",
                  "val2014", "--hold-out", "6", code=2), "--hold-out 6", "only 5 questions")
    fails(prepare("vqa", source, "--images", images, "--out", tmp_path / "x", "--answers", answers, "--split",
                  "train2014", "--hold-out", "1", code=2), "--hold-out-from val2014")
    fails(prepare("vqa", source, "--images", images, "--out", tmp_path / "x", code=2), "lower --min-answer-count")
    fails(prepare("vqa", source, "--images", images, "--out", tmp_path / "x", "--answers", answers,
                  "--min-answer-count", "2", code=2), "not both")
    put(tmp_path / "blank.txt", "blue\n\nyes\n")
    fails(prepare("vqa", source, "--images", images, "--out", tmp_path / "x", "--answers", tmp_path / "blank.txt",
                  code=2), "blank.txt:2", "empty line")
    put(tmp_path / "twice.txt", "blue\nyes\nblue\n")
    fails(prepare("vqa", source, "--images", images, "--out", tmp_path / "x", "--answers", tmp_path / "twice.txt",
                  code=2), "twice.txt:3", "repeats line 1")
    assert not (tmp_path / "x").exists()


def test_vqa_visual_genome_qa(tmp_path):
    source, images = _layout(tmp_path)
    qas = [{"id": 5, "qas": [{"qa_id": 1, "image_id": 5, "question": "What color is the sky?", "answer": "Blue."},
                             {"qa_id": 2, "image_id": 5, "question": "What is flying?", "answer": "A kite."}]},
           {"id": 6, "qas": [{"qa_id": 3, "image_id": 6, "question": "Is it day?", "answer": "Yes"}]}]
    path = put(tmp_path / "question_answers.json", json.dumps(qas))
    put(tmp_path / "vg" / "VG_100K" / "5.jpg", jpeg(5))
    put(tmp_path / "vg" / "VG_100K_2" / "6.jpg", jpeg(6))
    out = tmp_path / "out"
    prepare("vqa", source, "--images", images, "--out", out, "--min-answer-count", "2", "--split", "train2014",
            "--split", "val2014", "--visual-genome-qa", path, "--visual-genome-images", tmp_path / "vg")
    manifest, samples = read_split(out / "vg")
    assert manifest.classes == VOCABULARY and manifest.skipped == {"answer not in vocabulary": 1}
    assert manifest.extra == {"questions": 3, "answer_vocabulary": "built from train2014, val2014 (min count 2)"}
    assert {k: (s["jpg"], s["txt"]) for k, s in samples.items()} == {
        "qa1": (jpeg(5), b"What color is the sky?"), "qa3": (jpeg(6), b"Is it day?")}
    assert meta(samples["qa1"]) == {"id": 1, "image_id": 5, "question": "What color is the sky?", "answers": ["Blue."],
                                    "answer_type": None, "question_type": None, "targets": [[2, 1.0]]}
    assert meta(samples["qa3"])["targets"] == [[0, 1.0]]
    fails(prepare("vqa", source, "--images", images, "--out", tmp_path / "x", "--visual-genome-qa", path, code=2),
          "go together")
    put(tmp_path / "wrong.json", json.dumps({"qas": []}))
    fails(prepare("vqa", source, "--images", images, "--out", tmp_path / "x", "--min-answer-count", "2",
                  "--visual-genome-qa", tmp_path / "wrong.json", "--visual-genome-images", tmp_path / "vg", code=2),
          "is not a list", "question_answers.json")


def test_vqa_wrong_layouts(tmp_path):
    source, images = _layout(tmp_path)
    x = tmp_path / "x"
    fails(prepare("vqa", source, "--images", images, "--out", x, "--split", "test2015", code=2),
          "no split 'test2015'", "v2_OpenEnded_mscoco_test2015_questions.json", "v2_mscoco_test2015_annotations.json")
    fails(prepare("vqa", tmp_path / "coco", "--images", images, "--out", x, code=2), "holds no split",
          "v2_OpenEnded_mscoco_<split>_questions.json", "v2_mscoco_<split>_annotations.json")
    fails(prepare("vqa", source, "--images", tmp_path / "nowhere", "--out", x, code=2), "a folder of COCO images")
    put(source / vqa.QUESTIONS.format("val2014"), json.dumps({"questions": 5}))
    fails(prepare("vqa", source, "--images", images, "--out", x, code=2), "has no 'questions' list")
    put(source / vqa.QUESTIONS.format("val2014"), json.dumps({"questions": [{"question_id": 1, "question": "?"}]}))
    fails(prepare("vqa", source, "--images", images, "--out", x, code=2), "missing or malformed field 'image_id'")
    put(source / vqa.ANNOTATIONS.format("train2014"), "{not json")
    fails(prepare("vqa", source, "--images", images, "--out", x, code=2), "not valid JSON")
    assert not x.exists()
