"""The console tables at 80 columns: long words (task types, names, paths) stay whole on one line."""

import io

from rich.console import Console
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app
from uniperceiver_cli.cli.prepare_data import _report
from uniperceiver_cli.data.shards import Manifest
from uniperceiver_cli.evaluate.report import print_results
from uniperceiver_cli.evaluate.runners import EvalResult
from uniperceiver_cli.train.catalogue import shipped_names

runner = CliRunner()


def test_results_table_keeps_the_task_type_whole():
    console = Console(width=80, file=io.StringIO())
    result = EvalResult(task="image_classification", metrics={"acc@1": 50.0, "acc@5": 90.0}, num_samples=10,
                        notes=["skipped while loading: image_classification: 3 of the samples have no label"])
    print_results(result, "toyworld-images/val - image_classification", console=console)
    assert console.file.getvalue().count("image_classification") == 2, console.file.getvalue()


def test_prepare_data_table_keeps_words_and_the_whole_folder(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    manifest = Manifest(dataset="toyworld-images", split="val", modality="image", tasks=["image_classification"],
                        source="toyworld", num_samples=1234,
                        skipped={"image_classification sample without a label": 3, "undecodable image": 2})
    folder = "/data/uniperceiver/converted/toyworld-tiny/toyworld-images-for-image_classification/validation"
    _report(manifest, folder)
    output = capsys.readouterr().out
    assert "image_classification sample" in output, output
    assert "…" not in output, output  # the folder is folded over lines, not cut
    header = "".join(line.strip("┃ ").split("┃")[-1].strip() for line in output.splitlines() if "┃" in line)
    assert folder in header, output


def test_recipes_and_presets_tables_keep_names_whole():
    result = runner.invoke(app, ["recipes", "ls"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    for name in shipped_names():
        assert f" {name} " in result.output, result.output
    result = runner.invoke(app, ["presets"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    for cell in (" large-moe ", " 8 (top-2) ", " 1,413,535,750 "):
        assert cell in result.output, result.output
