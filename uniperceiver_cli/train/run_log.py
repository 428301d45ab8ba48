"""The run log: metrics.jsonl, the trackers (TensorBoard events by default, :mod:`.trackers`) and the console
progress, and the metric window the loop collects between two log lines."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from uniperceiver_cli.checkpoints.runs import METRICS_FILE
from uniperceiver_cli.model.moe import RouterStats
from uniperceiver_cli.parallel.context import Context, on_any_process
from uniperceiver_cli.train.checkpointing import TrainingStopped, err_console, last_good
from uniperceiver_cli.train.trackers import open_trackers


class RunLog:
    """metrics.jsonl, the trackers of ``report_to`` and the console progress (main process only): a progress bar
    on a terminal; where stderr is not one (a SLURM output file, ``| tee``), one plain line per logged step."""

    def __init__(self, run_dir: Path, total: int, enabled: bool, start: int = 0,
                 report_to: tuple[str, ...] | list[str] = ("tensorboard",), config: dict[str, Any] | None = None
                 ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.trackers = open_trackers(list(report_to), run_dir, config or {})
        self.file = open(run_dir / METRICS_FILE, "a")  # noqa: SIM115 - closed in close()
        self.total, self.start, self.began = total, start, time.monotonic()
        self.progress = None
        if err_console.is_terminal:
            self.progress = Progress(TextColumn("[bold]step"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[loss]}  {task.fields[rate]} samples/s"),
                                     TimeRemainingColumn(), console=err_console)
            self.progress.start()
            self.bar = self.progress.add_task("train", total=total, completed=start, loss="", rate="")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        plain = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(plain, allow_nan=False) + "\n")  # standard JSON: no NaN or Infinity
        self.file.flush()
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for tracker in self.trackers:
            tracker.log(values, record["step"])

    def advance(self, record: dict[str, Any]) -> None:
        """Show a logged step: its task losses and samples/s, with the elapsed time and an estimate of the rest."""
        if not self.enabled:
            return
        step, rate = record["step"], record["samples_per_s"]
        losses = {k.removesuffix("/loss"): v for k, v in record.items() if k.endswith("/loss")}
        if self.progress is not None:
            mean = sum(losses.values()) / max(1, len(losses))
            self.progress.update(self.bar, completed=step, loss=f"mean loss of {len(losses)} task(s) {mean:.3f}",
                                 rate=f"{rate:.0f}")
            return
        elapsed = time.monotonic() - self.began
        left = elapsed / max(1, step - self.start) * (self.total - step)
        tasks = " ".join(f"{name} {value:.4f}" for name, value in losses.items())
        err_console.print(f"step {step}/{self.total}  loss {tasks}  {rate:.0f} samples/s  elapsed {_clock(elapsed)}  "
                          f"eta {_clock(left)}", markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.enabled:
            if self.progress is not None:
                self.progress.stop()
            self.file.close()
            for tracker in self.trackers:
                tracker.close()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Window:
    """What the loop collects between two log lines, as device tensors: each micro-batch's loss and metrics (with
    its step and task) and each step's gradient norm. :meth:`check` and :meth:`means` sync with the host once."""

    def __init__(self, check_norms: bool, peak_flops: float | None = None) -> None:
        self.check_norms = check_norms  # fp16's loss scaler skips inf-gradient steps by design
        self.peak_flops = peak_flops  # the device's, for the model FLOPs utilisation (train/flops.py)
        self.sums: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.losses: list[tuple[int, str, torch.Tensor]] = []  # since the last check
        self.norms: list[tuple[int, torch.Tensor]] = []
        self.samples, self.flops, self.tic = 0, 0, time.perf_counter()

    def add(self, step: int, task: str, loss: torch.Tensor, metrics: dict[str, torch.Tensor], samples: int) -> None:
        self.sums[f"{task}/loss"].append(loss.detach())
        self.losses.append((step, task, loss.detach()))
        for key, value in metrics.items():
            self.sums[f"{task}/{key}"].append(value.detach())
        self.samples += samples

    def add_flops(self, flops: int) -> None:
        """A micro-step's model FLOPs on this process."""
        self.flops += flops

    def add_router(self, step: int, stats: RouterStats, loss: torch.Tensor) -> None:
        """Token and context routing's statistics of one micro-batch (logged under moe/) and its router loss."""
        self.losses.append((step, "router", loss.detach()))
        for key, value in stats.metrics().items():
            self.sums[f"moe/{key}"].append(value.detach())

    def add_norm(self, step: int, norm: torch.Tensor) -> None:
        self.sums["grad_norm"].append(norm)
        self.norms.append((step, norm))

    def check(self, ctx: Context, run_dir: Path) -> None:
        """Stop the run at the first non-finite loss (or gradient norm) since the last check, on any process."""
        values = [loss for _, _, loss in self.losses] + [norm for _, norm in self.norms if self.check_norms]
        bad = (~torch.isfinite(torch.stack(values).float())).any() if values else False
        if on_any_process(bad, ctx):
            where = next((f"step {step}: the {task} loss is {loss.item()}" for step, task, loss in self.losses
                          if not torch.isfinite(loss)), None)
            where = where or next((f"step {step}: the gradient norm is {norm.item()}" for step, norm in self.norms
                                   if not torch.isfinite(norm)), "a non-finite loss on another process")
            raise TrainingStopped(f"{where}; training stopped. {last_good(run_dir)}")
        self.losses.clear()
        self.norms.clear()

    def record(self, ctx: Context) -> dict[str, float]:
        """The window's means over every process, its samples/s and model FLOP/s (of every process, as if each did
        this one's work), and the model FLOPs utilisation where the device's peak is known; starts the next
        window."""
        seconds = time.perf_counter() - self.tic
        rate = self.samples * ctx.world_size / seconds
        flops_per_s = self.flops * ctx.world_size / seconds
        means = torch.stack([_finite_mean(v) for v in self.sums.values()])
        if ctx.world_size > 1:  # the global batch's means: every process ran the same tasks on its own data
            torch.distributed.all_reduce(means)
            means /= ctx.world_size
        record = {"samples_per_s": rate, "flops_per_s": flops_per_s}
        if self.peak_flops:
            record["mfu"] = flops_per_s / (self.peak_flops * ctx.world_size)
        record.update(zip(self.sums, means.tolist(), strict=True))
        self.sums.clear()
        self.samples, self.flops, self.tic = 0, 0, time.perf_counter()
        return record


def _finite_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the finite values (fp16's loss scaler makes some gradient norms inf by design); nan if none."""
    v = torch.stack(values).float()
    finite = torch.isfinite(v)
    return torch.where(finite, v, 0.0).sum() / finite.sum()
