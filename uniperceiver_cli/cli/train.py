"""``uniperceiver pretrain | finetune | prompt-tune``: run a recipe with the one training loop."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import typer

from uniperceiver_cli.cli.common import complete_recipe, err_console, one_line_warnings, pick_device, user_errors


def _run(stage: str, recipe: str, overrides: list[str] | None, run_dir: Path | None, resume: str | None,
         init: str | None, deepspeed: Path | None, device: str) -> None:
    from uniperceiver_cli.parallel.context import Context, init_distributed
    from uniperceiver_cli.train.catalogue import load_checked
    from uniperceiver_cli.train.loop import train

    with user_errors(), one_line_warnings():
        extra = list(overrides or [])
        if init is not None:
            extra.append(f"init={init}")
        if deepspeed is not None:
            extra += ["engine.kind=deepspeed", f"engine.deepspeed_config={deepspeed}"]
        spec = load_checked(recipe, extra)
        if spec.stage != stage:
            raise ValueError(f"recipe {spec.name} is a {spec.stage} recipe; run `uniperceiver {spec.stage}`")
        if stage != "pretrain" and not spec.init:
            raise ValueError(f"{stage} starts from a checkpoint: set init in the recipe or pass --init PATH")
        ctx = Context(device=pick_device(device))
        if spec.engine.kind == "deepspeed":
            ctx = init_distributed(ctx.device, timedelta(minutes=spec.engine.timeout_minutes))
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("launched on several processes: use engine.kind=deepspeed (or --deepspeed ds.json)")
        final = train(spec, run_dir or Path("runs") / spec.name, resume=resume, ctx=ctx)
    if ctx.main:
        err_console.print(f"[green]done:[/green] final bundle in {final}")


def _command(stage: str):  # noqa: ANN202
    def command(
        recipe: str = typer.Option(..., "--recipe", help="A shipped recipe name (see `recipes ls`) or a YAML path.",
                                   autocompletion=complete_recipe),
        overrides: list[str] | None = typer.Argument(None, help="Dotted overrides: train.lr=3e-4"),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Output folder (default runs/<recipe name>)."),
        resume: str | None = typer.Option(None, help="auto (the run dir's last checkpoint) or a checkpoint folder."),
        init: str | None = typer.Option(None, help="Start from this bundle or official checkpoint."),
        deepspeed: Path | None = typer.Option(None, "--deepspeed", help="Run under DeepSpeed with this JSON config."),
        device: str = typer.Option("auto", help="auto, cpu or cuda[:N] (DeepSpeed picks its own)."),
    ) -> None:
        _run(stage, recipe, overrides, run_dir, resume, init, deepspeed, device)

    command.__doc__ = {"pretrain": "Multi-task pre-training from a recipe.",
                       "finetune": "Fine-tune every parameter from a bundle or official checkpoint.",
                       "prompt-tune": "Train only the prompt parameters (prompts, norms)."}[stage]
    return command


pretrain = _command("pretrain")
finetune = _command("finetune")
prompt_tune = _command("prompt-tune")
