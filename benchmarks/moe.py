"""Training-step time of the MoE presets against their dense ones on the CPU, by routing level, and parameter
memory per process with and without expert parallelism.

A step is what the loop does for an image-classification batch: encode the class names as targets and the
images, the cross-entropy of the logits (+ the router losses for token and context routing, weights 0.01 and
0.001), backward, AdamW; forward + backward and the AdamW step are timed apart (AdamW's time follows the
parameter count, which expert parallelism divides for the experts). Random images at 64 x 64 (ToyWorld's
size; ``--image-size 224`` for the papers' 197 tokens per image), batches of 32 and 128, 10 classes; randomly
initialised weights. Each figure is the median of ``--steps`` steps after 3 warm-up steps, one process on
``--threads`` threads, all variants of a pair measured back to back in this process.

Parameter memory per process is counted from the model: the parameters outside the experts, plus the
experts' share at ``engine.expert_parallel`` N (num_experts / N of them), in fp32, and with AdamW's
gradient and two moments (x4).

    python benchmarks/moe.py                      # tiny and small pairs, every routing level
    python benchmarks/moe.py --pairs tiny --steps 20
    python benchmarks/moe.py --pairs small --batches 32 --image-size 224 --routings attribute
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.moe import ExpertLinear
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.train.losses import router_loss

# (routing, capacity factor): token routing dropless (every expert's buffer holds all T tokens: fixed shapes, E/k
# times the expert compute of a dense model at top-k) and with capacity 1.25 (GShard's training setting).
ROUTINGS = (("attribute", None), ("modality", None), ("token", None), ("token", 1.25), ("context", None))
CLASSES = [f"class {i}" for i in range(10)]


def _step_ms(model: UniPerceiver, images: torch.Tensor, labels: torch.Tensor, steps: int) -> tuple[float, float]:
    """Median milliseconds of forward + backward, and of the AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    compute, update = [], []
    for i in range(steps + 3):
        start = time.perf_counter()
        with model.router_log() as log:
            logits = model.classification_logits(images, model.encode_text(CLASSES))
            loss = F.cross_entropy(logits, labels)
            stats = log.stats()
            if stats is not None:
                loss = loss + router_loss(stats, 0.01, 0.001)
        loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 3:
            compute.append(middle - start)
            update.append(time.perf_counter() - middle)
    return 1000 * statistics.median(compute), 1000 * statistics.median(update)


def _memory_mb(model: UniPerceiver, expert_parallel: int) -> tuple[float, float]:
    experts = sum(p.numel() for m in model.modules() if isinstance(m, ExpertLinear) for p in m.parameters())
    per_process = model.num_parameters() - experts + experts / expert_parallel
    return 4 * per_process / 2**20, 16 * per_process / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["tiny", "small"], help="dense presets X with an X-moe")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64, help="64: ToyWorld's 17 tokens per image; 224: 197")
    parser.add_argument("--routings", nargs="+", default=sorted({r for r, _ in ROUTINGS}),
                        help="which routing levels to time")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 128],
                        help="images per step: the merge's cost is per call, the linears' per token")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
          flush=True)
    rows = []
    for batch in args.batches:
        gen = torch.Generator().manual_seed(0)
        size = args.image_size
        images = torch.randn(batch, 3, size, size, generator=gen)
        labels = torch.randint(0, len(CLASSES), (batch,), generator=gen)
        for dense in args.pairs:
            torch.manual_seed(0)
            variants = [(dense, "-", UniPerceiver(get_config(dense, image_size=size)))]
            for routing, capacity in (r for r in ROUTINGS if r[0] in args.routings):
                torch.manual_seed(0)
                moe = {"routing": routing, "capacity_factor": capacity}
                label = routing if capacity is None else f"{routing}, capacity {capacity}"
                config = get_config(f"{dense}-moe", image_size=size, moe=moe)
                variants.append((f"{dense}-moe", label, UniPerceiver(config)))
            base = None
            for preset, routing, model in variants:
                compute, update = _step_ms(model, images, labels, args.steps)
                base = base or (compute, update)
                memory = [_memory_mb(model, n) for n in (1, 2)]
                rows.append((preset, routing, batch, compute, compute / base[0], update, update / base[1],
                             *memory[0], *memory[1]))
                print(f"{preset} {routing} batch {batch}: {compute:.1f} ms forward + backward, {update:.1f} ms AdamW",
                      flush=True)
    print("\n| preset | routing | batch | fwd + bwd ms | vs dense | AdamW ms | vs dense | params MB, EP 1 "
          "| + AdamW, EP 1 | params MB, EP 2 | + AdamW, EP 2 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset, routing, batch, compute, c_ratio, update, u_ratio, p1, s1, p2, s2 in rows:
        print(f"| {preset} | {routing} | {batch} | {compute:.1f} | {c_ratio:.2f}x | {update:.1f} | {u_ratio:.2f}x | "
              f"{p1:.1f} | {s1:.1f} | {p2:.1f} | {s2:.1f} |")


if __name__ == "__main__":
    main()
