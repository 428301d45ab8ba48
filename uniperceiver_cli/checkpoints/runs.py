"""The run directory: what a training run writes, and where.

    RUN_DIR/config.yaml                     the resolved recipe
    RUN_DIR/metrics.jsonl, tensorboard/     the run log
    RUN_DIR/checkpoints/step-NNNNNNN/       a training checkpoint: state.pt (single engine) or deepspeed/ (+ experts/)
    RUN_DIR/final/                          the final bundle
    RUN_DIR/eval/                           evaluations
"""

from __future__ import annotations

STATE_FILE = "state.pt"  # the single engine's checkpoint inside checkpoints/step-N
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's checkpoint folder inside checkpoints/step-N
DEEPSPEED_TAG = "state"  # the tag of DeepSpeed's checkpoint inside that folder
CLIENT_KEY = "uniperceiver"  # the loop's own state (step, data position, RNGs) inside DeepSpeed's checkpoint
# Expert parallelism: each expert-parallel rank's experts, beside DeepSpeed's folder inside checkpoints/step-N
EXPERTS_DIR = "experts"


def expert_shard_file(rank: int, size: int) -> str:
    """The file of expert-parallel rank ``rank`` of ``size`` inside :data:`EXPERTS_DIR`."""
    return f"rank-{rank:03d}-of-{size:03d}.safetensors"
