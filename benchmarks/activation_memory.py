"""Activation memory of one captioning training step with and without activation checkpointing
(``train.activation_checkpointing``), on the CPU.

The step: ``--batch`` images at 224 x 224 with ``--words``-token captions through the two-stream captioning layout
(``caption_logits``: <|spe|> + 196 patches + the words + as many queries per sample), scored against a target set of
``--targets`` vocabulary rows (``vocabulary_targets``: sequences [id, <|endoftext|>] behind <|spe|>), cross-entropy,
backward. Randomly initialised weights, training mode (drop path on), fp32.

Two measures, for the plain and the checkpointed model:

- **Saved activations**, what autograd keeps for the backward pass once the forward pass is done (their peak):
  every tensor packed through ``torch.autograd.graph.saved_tensors_hooks`` that the graph still holds then, as unique
  storages, parameters left out (they are kept either way). Inside a checkpointed block checkpointing's own hook
  takes over and keeps nothing; what it keeps, the block's inputs, it saves through ours. Split by the two encoder
  calls (the target set, the captions), with the largest single block of the plain model: what the checkpointed
  backward holds on top, one block recomputed at a time.
- **Peak RSS**: each variant in a fresh process, the peak resident memory of forward + backward above what the
  process held before the step (VmHWM), with glibc's mmap threshold fixed at 64 KiB so that freed tensors
  leave the RSS; it includes the parameters' gradients (the same in both). With the seconds of that forward +
  backward (one step, so only a rough cost of the recomputation on a shared machine).

    python benchmarks/activation_memory.py                 # small, batch 8, 20 words, 2048 target rows
    python benchmarks/activation_memory.py --preset base --batch 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.train.plan import SavedTracker, storage_key

MB = 2**20


def _build(args: argparse.Namespace, checkpointing: bool) -> tuple[UniPerceiver, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = UniPerceiver(get_config(args.preset)).train()
    model.activation_checkpointing = checkpointing
    size = model.config.image_size
    data = {"images": torch.randn(args.batch, 3, size, size), "targets": torch.arange(args.targets),
            "words": torch.randint(0, args.targets, (args.batch, args.words))}
    return model, data


def _loss(model: UniPerceiver, data: dict[str, torch.Tensor], tracker: SavedTracker | None = None) -> torch.Tensor:
    phase = tracker.during if tracker is not None else lambda _: contextlib.nullcontext()
    with phase("target set"):
        vocabulary = model.vocabulary_targets(data["targets"])
    with phase("captions"):
        logits = model.caption_logits(data["images"], data["words"], None, vocabulary)
    return F.cross_entropy(logits.flatten(0, 1), data["words"].flatten())


def saved_activations(args: argparse.Namespace, checkpointing: bool) -> dict[str, int]:
    """Bytes saved for the backward at the end of the forward pass, by encoder call ("step": the loss), and the
    largest block call ("block"; of the plain model, what one recomputed block holds)."""
    model, data = _build(args, checkpointing)
    tracker = SavedTracker({storage_key(p) for p in model.parameters()})
    with tracker.watching(model):
        loss = _loss(model, data, tracker)
    phases, block, _ = tracker.totals()
    del loss
    return {**phases, "block": block}


def _status_bytes(key: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def peak_rss_child(args: argparse.Namespace) -> None:
    """In a fresh process: one forward + backward; print the peak RSS above the start and the seconds. The peak is
    VmHWM, reset to the current RSS just before the step (not ``ru_maxrss``, which a child inherits from the
    process that forked it)."""
    model, data = _build(args, args.child == "checkpointed")
    with torch.no_grad():  # warm the kernels up outside the measured peak, keeping nothing
        _loss(model, {"images": data["images"][:1], "targets": data["targets"][:16], "words": data["words"][:1] % 16})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    _loss(model, data).backward()
    seconds = time.perf_counter() - start
    print(json.dumps({"rss": _status_bytes("VmHWM") - before, "seconds": seconds}))


def peak_rss(args: argparse.Namespace, variant: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", variant, "--preset", args.preset, "--batch", str(args.batch),
               "--words", str(args.words), "--targets", str(args.targets)]
    # glibc's malloc keeps freed blocks below its (self-raising) mmap threshold in its heaps, so RSS would show its
    # own high-water mark: the same checkpointed step peaked anywhere between 1.2 and 3.3 GB over three runs. A fixed
    # 64 KiB threshold maps every larger tensor on its own and unmaps it when freed: RSS follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--words", type=int, default=20)
    parser.add_argument("--targets", type=int, default=2048)
    parser.add_argument("--child", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_rss_child(args)
        return
    plain, checkpointed = saved_activations(args, False), saved_activations(args, True)
    rss = {variant: peak_rss(args, variant) for variant in ("plain", "checkpointed")}
    print(f"{args.preset}, {args.batch} images 224 x 224 + {args.words}-token captions, {args.targets} target rows; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| measure | plain MB | checkpointed MB | ratio |\n|---|---:|---:|---:|")
    for phase in ("target set", "captions"):
        print(f"| saved activations: {phase} | {plain[phase] / MB:.1f} | {checkpointed[phase] / MB:.1f} | "
              f"{plain[phase] / checkpointed[phase]:.1f}x |")
    total_plain, total_checkpointed = (sum(v for k, v in p.items() if k != "block") for p in (plain, checkpointed))
    print(f"| saved activations: whole step | {total_plain / MB:.1f} | {total_checkpointed / MB:.1f} | "
          f"{total_plain / total_checkpointed:.1f}x |")
    with_block = total_checkpointed + plain["block"]
    print(f"| + the largest block recomputed in the backward | {total_plain / MB:.1f} | {with_block / MB:.1f} | "
          f"{total_plain / with_block:.1f}x |")
    print(f"| peak RSS of forward + backward (fresh process) | {rss['plain']['rss'] / MB:.1f} | "
          f"{rss['checkpointed']['rss'] / MB:.1f} | {rss['plain']['rss'] / rss['checkpointed']['rss']:.1f}x |")
    print(f"\nforward + backward: plain {rss['plain']['seconds']:.2f} s, checkpointed "
          f"{rss['checkpointed']['seconds']:.2f} s ({rss['checkpointed']['seconds'] / rss['plain']['seconds']:.2f}x)")


if __name__ == "__main__":
    main()
