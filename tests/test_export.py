"""``uniperceiver export``: each source kind round-trips into a bundle; bad input is one line, rc 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import uniperceiver_cli as up
from tests.helpers import Planted, random_png
from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.checkpoints.errors import CheckpointError, CheckpointWarning
from uniperceiver_cli.checkpoints.loading import load_model
from uniperceiver_cli.checkpoints.sources import classify_container, find_source, read_official, sha256_of
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.data.shards import Manifest, Sample, write_shards
from uniperceiver_cli.train import loop
from uniperceiver_cli.train.engines.deepspeed import safe_load
from uniperceiver_cli.train.engines.single import load_state_file
from uniperceiver_cli.train.recipe import validate

# Its tests share module fixtures that take a while to make: one xdist worker runs them all (Makefile).
pytestmark = pytest.mark.xdist_group("export")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export-data")
    manifest = Manifest(dataset="t", split="train", modality="image", tasks=["image_classification"], source="test",
                        classes=CLASSES)
    samples = [Sample(f"s{i}", image=random_png(i), image_ext="png", label=i % 3) for i in range(4)]
    write_shards(root / "split", samples, lambda s: s, manifest=manifest, min_shards=2, progress=False)
    return root


def _data(root: Path, **train) -> dict:
    return {"name": "export-test", "stage": "pretrain", "data_root": str(root),
            "tasks": [{"name": "cls", "type": "image_classification", "data": "split", "batch_size": 2,
                       "augment": False}],
            "model": {"preset": "tiny", "overrides": {"image_size": 32, "layer_scale_init": 1.0}},
            "train": {"steps": 4, "log_every": 1, "checkpoint_every": 2, "lr": 1e-3, "warmup_steps": 0, **train}}


@pytest.fixture(scope="module")
def single_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    loop.train(validate(_data(data_root)), run)
    return run


DEEPSPEED_SCRIPT = """
import json, sys, torch
from pathlib import Path
from uniperceiver_cli.train import loop
from uniperceiver_cli.parallel.context import init_distributed
from uniperceiver_cli.train.recipe import validate

ctx = init_distributed(torch.device("cpu"))
loop.train(validate(json.loads(sys.argv[1])), Path(sys.argv[2]), ctx=ctx)
"""


def _deepspeed_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def deepspeed_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 1-process DeepSpeed run: ZeRO 2, bf16 (autocast over fp32 weights), checkpoints at steps 2 and 4."""
    pytest.importorskip("deepspeed")
    data = _data(data_root, precision="bf16")
    data["engine"] = {"kind": "deepspeed", "zero_stage": 2}
    run = tmp_path_factory.mktemp("ds") / "run"
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, json.dumps(data), str(run)], cwd=REPO,
                          env=_deepspeed_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


def _cli(*args: str):  # noqa: ANN202
    return CliRunner().invoke(app, ["export", *map(str, args)])


def _ok(*args: str) -> str:
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    return result.output


def _tensors(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bundle / "model.safetensors"))


def _assert_same(exported: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        assert exported[key].dtype == torch.float32 or not value.is_floating_point(), key
        assert torch.equal(exported[key], value.to(exported[key].dtype)), key


def _provenance(bundle: Path) -> dict:
    return json.loads((bundle / "config.json").read_text())["provenance"]


# ------------------------------------------------------------------------------------------------- round trips


def test_bundle_re_saves_and_changes_dtype(tmp_path: Path):
    torch.manual_seed(0)
    model = up.create_model("tiny-moe", image_size=32, prompt={"classifier_classes": 3})
    model.class_names = ["a", "b", "c"]
    save_bundle(model, tmp_path / "b")
    out = _ok(tmp_path / "b", "--out", tmp_path / "fp32")
    assert out.splitlines()[0] == f"source: bundle {tmp_path / 'b'}"
    _assert_same(_tensors(tmp_path / "fp32"), model.state_dict())
    assert load_model(tmp_path / "fp32").class_names == ["a", "b", "c"]
    _ok(tmp_path / "fp32", "--out", tmp_path / "bf16", "--dtype", "bf16")
    half = _tensors(tmp_path / "bf16")
    assert half["head.proj.weight"].dtype == torch.bfloat16
    assert torch.equal(load_model(tmp_path / "bf16").head.proj.weight, model.head.proj.weight.bfloat16().float())
    record = _provenance(tmp_path / "bf16")
    assert record["kind"] == "bundle" and record["dtype"] == "bf16" and record["toolkit_version"] == up.__version__
    assert record["sha256"] == sha256_of(tmp_path / "fp32" / "model.safetensors")
    assert record["previous"]["kind"] == "bundle"
    _ok(tmp_path / "bf16", "--out", tmp_path / "bf16", "--dtype", "fp32", "--force")  # in place
    assert _tensors(tmp_path / "bf16")["head.proj.weight"].dtype == torch.float32


def test_run_directory_final_and_steps(single_run: Path, tmp_path: Path):
    out = _ok(single_run, "--out", tmp_path / "final")
    assert out.splitlines()[0] == f"source: run directory {single_run}: final bundle (step 4) {single_run / 'final'}"
    _assert_same(_tensors(tmp_path / "final"), _tensors(single_run / "final"))
    state = load_state_file(single_run / "checkpoints" / "step-0000002" / "state.pt")
    out = _ok(single_run, "--step", "2", "--out", tmp_path / "step2")
    assert "single-engine checkpoint (step 2)" in out.splitlines()[0]
    _assert_same(_tensors(tmp_path / "step2"), state["model"])
    record = _provenance(tmp_path / "step2")
    assert record["step"] == 2 and record["recipe"] == "export-test" and record["kind"] == "state"
    assert record["sha256"] == sha256_of(single_run / "checkpoints" / "step-0000002" / "state.pt")
    config = json.loads((tmp_path / "step2" / "config.json").read_text())["model"]
    assert config["image_size"] == 32 and config["layer_scale_init"] == 1.0  # from the run's config.yaml
    _ok(single_run, "--latest", "--out", tmp_path / "latest")
    _assert_same(_tensors(tmp_path / "latest"), _tensors(single_run / "final"))  # the last checkpoint is the end
    assert load_model(single_run, step=2).config == load_model(tmp_path / "step2").config


def test_single_engine_state_file_and_folder(single_run: Path, tmp_path: Path):
    folder = single_run / "checkpoints" / "step-0000004"
    expected = load_state_file(folder / "state.pt")["model"]
    for i, src in enumerate([folder, folder / "state.pt"]):
        out = _ok(src, "--out", tmp_path / str(i), "--from", "state")
        assert out.splitlines()[0].startswith("source: single-engine checkpoint (step 4)")
        _assert_same(_tensors(tmp_path / str(i)), expected)
    # a state.pt on its own: the config is inferred from the shapes (the tiny preset)
    shutil.copy(folder / "state.pt", tmp_path / "alone.pt")
    _ok(tmp_path / "alone.pt", "--out", tmp_path / "alone")
    _assert_same(_tensors(tmp_path / "alone"), expected)
    model = load_model(tmp_path / "alone.pt")
    assert model.config.width == 64 and model.config.heads == 2


def test_deepspeed_checkpoint_bf16_exports_fp32(deepspeed_run: Path, tmp_path: Path):
    folder = deepspeed_run / "checkpoints" / "step-0000004"
    out = _ok(folder, "--out", tmp_path / "ds")
    assert out.splitlines()[0] == f"source: deepspeed checkpoint (ZeRO 2, 1 process, step 4) {folder}"
    states = folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    module = safe_load(states)["module"]
    assert module["head.proj.weight"].dtype == torch.float32  # bf16 is autocast over fp32 weights
    exported = _tensors(tmp_path / "ds")
    _assert_same(exported, module)
    _assert_same(exported, _tensors(deepspeed_run / "final"))  # the run's own final weights
    older = tmp_path / "older" / "step-0000004"  # as DeepSpeed's bf16 mode wrote it: bf16 module weights
    shutil.copytree(folder, older)
    written = safe_load(states)
    written["module"] = {k: v.bfloat16() if v.is_floating_point() else v for k, v in written["module"].items()}
    torch.save(written, older / "deepspeed" / "state" / "mp_rank_00_model_states.pt")
    _ok(older, "--out", tmp_path / "older-bundle")
    _assert_same(_tensors(tmp_path / "older-bundle"), written["module"])
    record = _provenance(tmp_path / "ds")
    assert (record["kind"], record["zero_stage"], record["processes"], record["step"]) == ("deepspeed", 2, 1, 4)
    # every way of naming it: the run with --step, the deepspeed/ folder, the tag folder, the model-states file
    for i, src in enumerate([folder / "deepspeed", folder / "deepspeed" / "state",
                             folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt"]):
        _ok(src, "--out", tmp_path / str(i))
        _assert_same(_tensors(tmp_path / str(i)), module)
    _ok(deepspeed_run, "--step", "2", "--out", tmp_path / "s2", "--from", "run")
    assert load_model(deepspeed_run, step=2).config.image_size == 32


@pytest.mark.xdist_group("processes")  # with the other tests that start several processes (Makefile)
def test_two_process_zero2_checkpoint(data_root: Path, tmp_path: Path):
    from tests.train.test_deepspeed import _launch, _recipe

    run = tmp_path / "run"
    _launch(_recipe(data_root, batch_size=1, kind="deepspeed", zero=2, checkpoint_every=2), run, launcher="torchrun")
    folder = run / "checkpoints" / "step-0000004"
    out = _ok(folder, "--out", tmp_path / "ds2")
    assert out.splitlines()[0] == f"source: deepspeed checkpoint (ZeRO 2, 2 processes, step 4) {folder}"
    _assert_same(_tensors(tmp_path / "ds2"), _tensors(run / "final"))
    (folder / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _refused(folder, tmp_path / "missing", "incomplete DeepSpeed checkpoint: it was written by 2 process(es) but "
             "the optimizer part of rank(s) 1 is missing")


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_official_fixtures_round_trip(reference_dir: Path, tmp_path: Path, variant: str):
    name, io_name = ("ref_state.pt", "ref_io.pt") if variant == "dense" else ("ref_moe_state.pt", "ref_moe_io.pt")
    out = _ok(reference_dir / name, "--out", tmp_path / "b")
    assert out.splitlines()[0] == f'source: official checkpoint ("torch" format) {reference_dir / name}'
    official, bundle = load_model(reference_dir / name), load_model(tmp_path / "b")
    assert official.config == bundle.config and (bundle.config.moe is not None) == (variant == "moe")
    _assert_same(_tensors(tmp_path / "b"), official.state_dict())
    inputs = torch.load(reference_dir / io_name, map_location="cpu", weights_only=True)["image_cls"]["inputs"]
    images = inputs["input_sample_list"][0]["data"]
    with torch.no_grad():
        torch.testing.assert_close(bundle.encode_image(images), official.encode_image(images), rtol=0, atol=0)


def test_official_deepspeed_file_and_forcing(reference_dir: Path, tmp_path: Path):
    from tests.test_checkpoints import _to_deepspeed

    state = torch.load(reference_dir / "ref_state.pt", map_location="cpu", weights_only=True)
    torch.save({"module": _to_deepspeed(state, torch.zeros(64))}, tmp_path / "mp_rank_00_model_states.pt")
    out = _ok(tmp_path / "mp_rank_00_model_states.pt", "--out", tmp_path / "b", "--from", "official")
    assert '"ds" format' in out.splitlines()[0]
    _assert_same(_tensors(tmp_path / "b"), load_model(reference_dir / "ref_state.pt").state_dict())
    _refused(reference_dir / "ref_state.pt", tmp_path / "x", "is not a DeepSpeed checkpoint (it is a official",
             "--from", "deepspeed")


# ------------------------------------------------------------------------------------------------- the detector


def test_our_deepspeed_checkpoint_is_never_taken_for_the_references(tmp_path: Path):
    model = up.create_model("tiny")
    ours = {"module": model.state_dict(), "dp_world_size": 1, "ds_config": {"zero_optimization": {"stage": 0}},
            "uniperceiver": {"step": 3}}
    kind, state, fmt = classify_container(ours, tmp_path / "x.pt")
    assert (kind, fmt) == ("deepspeed", None) and state is ours["module"]
    assert classify_container({"module": model.state_dict()}, tmp_path / "x.pt")[0] == "deepspeed"  # names alone
    assert classify_container({"model": model.state_dict(), "step": 1}, tmp_path / "x.pt")[0] == "state"
    reference = {"fused_encoder.layers.0.gamma_1": torch.zeros(2), "token_embed.embeddings.weight": torch.zeros(2)}
    assert classify_container({"module": reference}, tmp_path / "x.pt")[::2] == ("official", "ds")
    assert classify_container(reference, tmp_path / "x.pt")[::2] == ("official", "torch")
    with pytest.raises(CheckpointError, match="carries this toolkit's training state but its module keys"):
        classify_container({"module": reference, "uniperceiver": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="neither this toolkit's nor the reference's"):
        classify_container({"module": {"a.b": torch.zeros(1)}}, tmp_path / "x.pt")
    torch.save(ours, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="written by this toolkit, not an official checkpoint"):
        read_official(tmp_path / "mp_rank_00_model_states.pt")
    source = find_source(tmp_path / "mp_rank_00_model_states.pt")
    assert (source.kind, source.step, source.zero_stage, source.processes) == ("deepspeed", 3, 0, 1)
    loaded = load_model(tmp_path / "mp_rank_00_model_states.pt")  # our names, loaded as they are
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------------- bad input


def _refused(src: Path, out: Path, message: str, *args: str) -> None:
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    result = _cli(src, "--out", out, *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert after == before  # nothing written, no temporary folder left


def test_bad_sources_are_one_line(single_run: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    out = tmp_path / "out" / "b"
    out.parent.mkdir()
    _refused(tmp_path / "empty", out, "is not a checkpoint: neither a bundle")
    _refused(tmp_path / "notes.txt", out, "cannot read checkpoint")
    _refused(tmp_path / "nothing", out, "does not exist")
    _refused(single_run, out, "has no checkpoint of step 3 (available: 2, 4)", "--step", "3")
    _refused(single_run / "final", out, "is not a run directory", "--latest")
    _refused(single_run, out, "is not a DeepSpeed checkpoint", "--from", "deepspeed")


def test_truncated_and_planted_files_are_refused(single_run: Path, tmp_path: Path):
    out = tmp_path / "out" / "b"
    out.parent.mkdir()
    data = (single_run / "checkpoints" / "step-0000002" / "state.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.pt", out, "truncated, corrupt or unsafe")
    marker = tmp_path / "pwned"
    torch.save({"model": up.create_model("tiny").state_dict(), "step": Planted(marker)}, tmp_path / "planted.pt")
    _refused(tmp_path / "planted.pt", out, "unsafe (it would call io.open, which a checkpoint may not)")
    assert not marker.exists()
    state = torch.load(tmp_path / "planted.pt", weights_only=False)  # only here does the pickle run
    assert marker.exists() and state["step"] is not None


def test_missing_rank_is_refused(deepspeed_run: Path, tmp_path: Path):
    folder = tmp_path / "checkpoints" / "step-0000004"
    shutil.copytree(deepspeed_run / "checkpoints" / "step-0000004", folder)
    states = folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    obj = safe_load(states)
    obj["dp_world_size"] = 3  # as if 3 processes wrote it: only rank 0's optimizer part is here
    torch.save(obj, states)
    out = tmp_path / "out" / "b"
    out.parent.mkdir()
    _refused(folder, out, "the optimizer part of rank(s) 1, 2 is missing")


def test_shapes_that_fit_no_config(single_run: Path, tmp_path: Path):
    out = tmp_path / "out" / "b"
    out.parent.mkdir()
    state = single_run / "checkpoints" / "step-0000004" / "state.pt"
    _refused(state, out, "does not fit the model", "--preset", "small")
    odd = up.create_model("tiny", layers=2).state_dict()  # no preset has these shapes, no config.yaml
    torch.save({"model": odd}, tmp_path / "odd.pt")
    _refused(tmp_path / "odd.pt", out, "match no preset; give --preset")
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("preset: tiny", "preset: small"))
    (run / "model.json").unlink()  # a run written before model.json: its config comes from config.yaml
    _refused(run, out, "does not fit the model", "--step", "2")


def test_existing_out_needs_force(single_run: Path, tmp_path: Path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused(single_run, out, "already exists; pass --force to replace it")
    _refused(single_run, out, "is not a bundle (it holds keep.txt); export to another folder", "--force")
    assert (out / "keep.txt").read_text() == "mine"  # --force replaces a bundle, never a folder of other things
    (out / "keep.txt").unlink()
    _ok(single_run, "--out", out, "--force")  # an empty folder
    _ok(single_run, "--out", out, "--force", "--dtype", "bf16")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _provenance(out)["dtype"] == "bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    _refused(single_run, single_run / "checkpoints", "is not a bundle", "--force")
    _refused(single_run, single_run / "final", "holds the source", "--force")
    _refused(single_run, single_run, "is not a bundle", "--force", "--step", "2")


def _ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def _left_by_a_stopped_export(out: Path, kind: str, owner: str) -> Path:
    """The staging folder ``.OUT.KIND-OWNER`` (KIND "export" or "replaced"), as an export killed midway leaves it."""
    folder = out.parent / f".{out.name}.{kind}-{owner}"
    save_bundle(up.create_model("tiny", image_size=32), folder)
    return folder


def test_a_bundle_left_aside_by_a_stopped_export_force_is_restored_on_load(tmp_path: Path):
    out, owner = tmp_path / "b", f"{_ended_pid()}@{socket.gethostname()}"
    previous = _left_by_a_stopped_export(out, "replaced", owner)  # killed between its two renames: no b/
    _left_by_a_stopped_export(out, "export", owner)  # the new bundle, complete but not renamed in
    expected = _tensors(previous)
    with pytest.warns(CheckpointWarning) as caught:
        load_model(out)
    assert {str(w.message) for w in caught} == {
        f"{out} was missing: an export --force stopped while replacing it had moved it to .b.replaced-{owner}; "
        f"renamed it back", f"removed {tmp_path / f'.b.export-{owner}'}, left by an export that was stopped"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    _assert_same(_tensors(out), expected)


def test_an_export_removes_what_stopped_exports_left(tmp_path: Path):
    save_bundle(up.create_model("tiny", image_size=32), tmp_path / "src")
    out, host, ended = tmp_path / "b", socket.gethostname(), _ended_pid()
    save_bundle(up.create_model("tiny", image_size=32), out)
    ended_here = [_left_by_a_stopped_export(out, "export", f"{ended}@{host}"),
                  _left_by_a_stopped_export(out, "export", str(ended)),  # named by earlier versions: no host
                  _left_by_a_stopped_export(out, "replaced", f"{ended}@{host}")]  # b/ is there: the old bundle
    running = [_left_by_a_stopped_export(out, "export", f"{os.getppid()}@{host}"),
               _left_by_a_stopped_export(out, "export", f"{ended}@elsewhere.example")]  # cannot be told: kept
    output = _ok(tmp_path / "src", "--out", out, "--force")
    for folder in ended_here:
        assert f"warning: removed {folder}, left by an export that was stopped" in output
        assert not folder.exists()
    assert all(folder.exists() for folder in running) and output.count("warning:") == 3
    _assert_same(_tensors(out), _tensors(tmp_path / "src"))
    planted = _left_by_a_stopped_export(out, "export", "9" * 30)  # no PID is that large: not taken for ended
    _ok(tmp_path / "src", "--out", out, "--force")
    assert planted.exists()


def test_a_relative_step_folder_finds_its_runs_config(single_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    step = sorted((single_run / "checkpoints").iterdir())[-1]
    monkeypatch.chdir(step.parent)
    _ok(step.name, "--out", tmp_path / "b")
    assert _provenance(tmp_path / "b")["recipe"] == "export-test"
    config = json.loads((tmp_path / "b" / "config.json").read_text())["model"]
    assert config["image_size"] == 32  # the recipe's override, not a preset guessed from the shapes


def test_a_malformed_run_config_is_one_line(single_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    (run / "config.yaml").write_text("train: 5\n")
    result = _cli(run, "--out", tmp_path / "b")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output  # the step is just unknown


def test_evaluate_takes_a_run_directory(single_run: Path, data_root: Path, tmp_path: Path):
    from uniperceiver_cli.checkpoints.sources import model_identity

    identity = model_identity(single_run)
    assert identity["sha256"] == sha256_of(single_run / "final" / "model.safetensors")
