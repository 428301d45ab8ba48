"""Splits over http(s): a split URL's manifest.json is fetched and its shards streamed, only with
UNIPERCEIVER_STREAMING=1 (never enabled by a recipe). Against a server on 127.0.0.1: evaluate and a short pretrain
over HTTP equal the same over the folder, and a connection dropped mid-shard costs only that shard's samples."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import uniperceiver_cli as up
from tests.helpers import image_split
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.data.loader import UNREADABLE_SHARD
from uniperceiver_cli.data.shards import STREAMING_ENV
from uniperceiver_cli.evaluate.tasks import evaluate_task
from uniperceiver_cli.train.catalogue import file_problems
from uniperceiver_cli.train.loop import train
from uniperceiver_cli.train.recipe import EvalTaskSpec, validate

runner = CliRunner()
DROPPED = "/dropped/train/shard-000001.tar"  # served halfway, then the connection is closed


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path != DROPPED:
            super().do_GET()
            return
        body = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def root(toyworld_32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ToyWorld beside a 4-shard image split, served as one tree."""
    folder = tmp_path_factory.mktemp("served")
    (folder / "toyworld").symlink_to(toyworld_32)
    image_split(folder / "dropped" / "train", 16, min_shards=4)
    return folder


@pytest.fixture
def server(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return up.save_bundle(up.create_model("tiny", image_size=32, layer_scale_init=1.0),
                          tmp_path_factory.mktemp("bundle") / "b")


def _evaluate(data: str, bundle: Path, out: Path) -> tuple[dict, str]:
    result = runner.invoke(app, ["evaluate", "--data", data, "--model", str(bundle), "--out", str(out),
                                 "--task", "image_retrieval", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text()), (out / "predictions.jsonl").read_text()


def test_evaluate_over_http_equals_the_folder(server: str, root: Path, bundle: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{server}/toyworld/images/test"
    result = runner.invoke(app, ["evaluate", "--data", url, "--preset", "tiny"])
    assert result.exit_code == 2 and f"set {STREAMING_ENV}=1" in result.stderr  # the user's switch, off
    monkeypatch.setenv(STREAMING_ENV, "1")
    over_http, http_rows = _evaluate(url, bundle, tmp_path / "http")
    local, local_rows = _evaluate(str(root / "toyworld" / "images" / "test"), bundle, tmp_path / "local")
    assert over_http["metrics"] == local["metrics"] and http_rows == local_rows
    assert over_http["num_samples"] == 32 and over_http["data"]["path"] == url


def test_a_dropped_connection_costs_only_its_shards_samples(server: str, bundle: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STREAMING_ENV, "1")
    spec = EvalTaskSpec(name="colours", type="image_classification", data=f"{server}/dropped/train", batch_size=4)
    evaluation = evaluate_task(up.load_model(bundle), spec)
    assert evaluation.data["skipped"] == {UNREADABLE_SHARD: 1}
    keys = [p["key"] for p in evaluation.result.predictions]
    whole = [f"s{i}" for i in range(16)]  # 4 shards of 4, in order
    assert [k for k in keys if k not in whole[4:8]] == whole[:4] + whole[8:]  # every other shard's samples
    assert len(keys) < 16


TASKS = [
    {"name": "shape", "type": "image_classification", "data": "images/train", "label_set": "shape", "batch_size": 8,
     "augment": False},
    {"name": "caption", "type": "image_caption", "data": "images/train", "batch_size": 4, "vocabulary": "corpus",
     "augment": False},
    {"name": "mlm", "type": "text_mlm", "data": "text/train", "batch_size": 4, "max_text_len": 32,
     "vocabulary": "sampled", "negatives": 64},
]


def _recipe(data_root: str, prefix: str = "") -> dict:
    return {"name": "remote", "stage": "pretrain", "data_root": data_root,
            "tasks": [{**t, "data": prefix + t["data"]} for t in TASKS],
            "model": {"preset": "tiny", "overrides": {"image_size": 32}},
            "train": {"steps": 6, "log_every": 2, "warmup_steps": 0}}


def test_a_short_pretrain_over_http_equals_the_folder(server: str, root: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    remote = validate(_recipe(".", f"{server}/toyworld/"))
    assert file_problems(remote)[0].endswith(f"set {STREAMING_ENV}=1 to stream shards from it")
    with pytest.raises(ValueError, match=f"set {STREAMING_ENV}=1"):  # naming a URL does not enable streaming
        train(remote, tmp_path / "refused")
    monkeypatch.setenv(STREAMING_ENV, "1")
    assert file_problems(remote) == []
    runs = {"http": train(remote, tmp_path / "http"),
            "folder": train(validate(_recipe(str(root / "toyworld"))), tmp_path / "folder")}

    def losses(final: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
                for line in (final.parent / "metrics.jsonl").read_text().splitlines()]

    assert losses(runs["http"]) == losses(runs["folder"])
    weights = [load_file(str(run / "model.safetensors")) for run in runs.values()]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    vocabularies = [json.loads((run / "config.json").read_text())["targets"]["caption_vocabulary"]
                    for run in runs.values()]
    assert vocabularies[0] == vocabularies[1] and len(vocabularies[0]) > 10  # the corpus, streamed


def test_only_http_split_urls_are_taken_by_a_recipe() -> None:
    for bad in ("pipe:curl x", "s3://bucket/images/train", "ftp://host/x"):
        with pytest.raises(ValueError, match="is a pipe or URL, not a local path"):
            validate(_recipe(".", "") | {"tasks": [{**TASKS[0], "data": bad}]})
