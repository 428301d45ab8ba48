"""prepare-data glue: the official TSV layouts (CoLA without a header, MNLI's two dev files) into cloze prompts
with their label words; a bad row is skipped and counted, STS-B refused in one line; and a converted split
trains and evaluates as text classification."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.data.test_sources import prepare, put, read_split
from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.evaluate.tasks import evaluate_task
from uniperceiver_cli.model.config import SPE_ID, get_config
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.train.recipe import EvalTaskSpec


def _glue(root: Path) -> Path:
    put(root / "SST-2" / "train.tsv", "sentence\tlabel\nit 's a charming journey . \t1\na dull mess \t0\n")
    put(root / "SST-2" / "dev.tsv", "sentence\tlabel\nlovely \"little\" film\t1\n")
    put(root / "CoLA" / "train.tsv", "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the "
                                     "pub.\n")
    put(root / "CoLA" / "dev.tsv", "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n")
    put(root / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA cat sat.\tAn animal sat.\tentailment\n"
                                    "1\tA cat sat.\tA dog ran.\tnot_entailment\n2\tNo label here.\tNone.\n")
    put(root / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tIt rained.\tIt was wet.\tentailment\n")
    mnli = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label\n0\t1\t1\tx\tA man eats.\tA person " \
           "eats.\t{}\n"
    for split, label in (("train", "entailment"), ("dev_matched", "neutral"), ("dev_mismatched", "contradiction")):
        put(root / "MNLI" / f"{split}.tsv", mnli.format(label))
    mrpc = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe left.\tHe went away.\n"  # with GLUE's BOM
    put(root / "MRPC" / "train.tsv", mrpc)
    put(root / "MRPC" / "dev.tsv", mrpc)
    put(root / "STS-B" / "train.tsv", "index\tsentence1\tsentence2\tscore\n")
    return root


def test_glue_tasks_become_cloze_prompts(tmp_path: Path):
    root, out = _glue(tmp_path / "glue"), tmp_path / "out"
    prepare("glue", root, "--out", out, "--task", "SST-2", "--task", "CoLA", "--task", "RTE", "--task", "MNLI",
            "--min-shards", "1")
    manifest, samples = read_split(out / "SST-2" / "train")
    assert manifest.classes == ["bad", "wonderful"] and manifest.tasks == ["text_classification"]
    texts = {k: s["txt"].decode() for k, s in samples.items()}
    assert texts["sst-2-train-0000000"] == "it 's a charming journey . <|endoftext|> It is <|spe|>."
    assert samples["sst-2-train-0000000"]["cls"] == b"1"
    _, samples = read_split(out / "SST-2" / "dev")
    assert samples["sst-2-dev-0000000"]["txt"].decode().startswith('lovely "little" film')  # quotes kept as text
    _, samples = read_split(out / "CoLA" / "train")
    assert [s["cls"] for s in samples.values()] == [b"1", b"0"]  # no header: the first row is data
    manifest, samples = read_split(out / "RTE" / "train")
    assert samples["rte-train-0000000"]["txt"].decode() == "A cat sat ? <|endoftext|> it is <|spe|> , An animal sat."
    assert manifest.classes == ["no", "yes"] and manifest.num_samples == 2 and manifest.skipped == {"bad label": 1}
    assert sorted(p.name for p in (out / "MNLI").iterdir()) == ["dev_matched", "dev_mismatched", "train"]
    manifest, samples = read_split(out / "MNLI" / "dev_mismatched")
    assert manifest.classes == ["no", "maybe", "yes"] and [s["cls"] for s in samples.values()] == [b"0"]
    prepare("glue", root, "--out", out, "--task", "MRPC", "--min-shards", "1")
    _, samples = read_split(out / "MRPC" / "dev")
    assert [(s["txt"].decode(), s["cls"]) for s in samples.values()] == [("He left . <|spe|> , He went away.", b"1")]
    result = prepare("glue", root, "--out", out, "--task", "STS-B", code=2)
    assert "STS-B is a regression" in result.output and result.output.count("\n") == 1

    batch = next(iter(make_loader(out / "RTE" / "train", task="text_classification", batch_size=2, image_size=32,
                                  train=False)))
    assert (batch["text_ids"][torch.arange(2), batch["slots"]] == SPE_ID).all()
    torch.manual_seed(0)
    model = UniPerceiver(get_config("tiny", image_size=32)).eval()
    save_bundle(model, tmp_path / "bundle")
    spec = EvalTaskSpec(name="rte", type="text_classification", data=str(out / "RTE" / "dev"))
    result = evaluate_task(model, spec).result
    assert result.num_samples == 1 and set(result.metrics) == {"accuracy", "matthews", "f1"}
    from typer.testing import CliRunner

    from uniperceiver_cli.cli.app import app

    cli = CliRunner().invoke(app, ["evaluate", "--data", str(out / "RTE" / "dev"), "--model", str(tmp_path / "bundle"),
                                   "--out", str(tmp_path / "eval")])  # the split's task: text_classification
    assert cli.exit_code == 0, cli.output
    settings = json.loads((tmp_path / "eval" / "results.json").read_text())["settings"]
    assert settings["max_text_len"] == 256  # the prompts' default, not retrieval's 50
