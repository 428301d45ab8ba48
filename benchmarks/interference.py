"""Task interference as the papers measured it (the reference's ``tools/calinterference.ipynb``): the cosine between
two tasks' gradients on chosen feed-forward weights. A negative cosine means a step for one task undoes part of a
step for the other; routing tasks to different experts should move the cosines of tasks that conflict towards 0.

    python benchmarks/interference.py runs/toyworld-tiny/final runs/claims/moe-seed0/final --batches 8

The reference compared ImageNet, BooksWiki and CC12M on the second FFN linear of layers 3, 7 and 11 of 12; here
every layer's ``mlp.fc2`` (an MoE layer's experts together) on ToyWorld's training tasks, each gradient summed
over ``--batches`` batches (in eval mode: no dropout or noise) so that one batch's noise does not decide the sign.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn


def fc2_weights(model: nn.Module) -> list[str]:
    """The names of every block's second feed-forward weight (an MoE block's: all its experts)."""
    return [name for name, _ in model.named_parameters() if name.endswith("mlp.fc2.weight")]


def gradients(model: nn.Module, losses: Iterable[Callable[[], torch.Tensor]], params: Sequence[str]) -> torch.Tensor:
    """The gradient of the summed ``losses`` (each a closure computing one batch's loss) with respect to the named
    parameters, flattened into one vector (float64)."""
    chosen = dict(model.named_parameters())
    missing = [name for name in params if name not in chosen]
    if missing:
        raise ValueError(f"the model has no parameter {', '.join(missing)}")
    weights = [chosen[name] for name in params]
    total = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for loss in losses:
        for acc, grad in zip(total, torch.autograd.grad(loss(), weights, allow_unused=True), strict=True):
            if grad is not None:
                acc += grad.double()
    return torch.cat([t.flatten() for t in total])


def cosines(vectors: dict[str, torch.Tensor]) -> dict[tuple[str, str], float]:
    """The cosine between each pair of named gradient vectors (a pair with a zero vector: 0)."""
    out = {}
    for (a, u), (b, v) in itertools.combinations(vectors.items(), 2):
        norm = float(u.norm() * v.norm())
        out[(a, b)] = float(u @ v) / norm if norm > 0 else 0.0
    return out


def task_gradients(model_path: Path, recipe_name: str, batches: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Each training task of a recipe: its gradient on every fc2 weight of the model at ``model_path``, summed over
    ``batches`` batches of its training split (evaluation transforms, fixed order)."""
    from uniperceiver_cli.checkpoints.loading import load_model
    from uniperceiver_cli.data.loader import make_loader
    from uniperceiver_cli.train.catalogue import load_checked
    from uniperceiver_cli.train.tasks import TrainTask

    recipe = load_checked(recipe_name)
    model = load_model(model_path).eval()
    params = fc2_weights(model)
    out = {}
    for spec in recipe.tasks:
        task = TrainTask.build(spec, Path(recipe.data_root))
        loader = make_loader(task.directory, task=spec.type, batch_size=spec.batch_size, train=True,
                             image_size=model.config.image_size, num_frames=spec.num_frames,
                             max_text_len=spec.max_text_len, seed=seed, label_set=spec.label_set, augment=False,
                             frame_stride=spec.frame_stride, epochs=None, answers=task.answers)
        chosen = list(itertools.islice(iter(loader), batches))
        generator = torch.Generator().manual_seed(seed)
        out[spec.name] = gradients(model, [lambda b=b, t=task, g=generator: t.loss(model, b, g)[0] for b in chosen],
                                   params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="bundles or run folders to compare")
    parser.add_argument("--recipe", default="toyworld-tiny", help="whose training tasks (and data) to use")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    for path in args.models:
        print(f"{path}:")
        for (a, b), value in cosines(task_gradients(path, args.recipe, args.batches)).items():
            print(f"  {a:>24} x {b:<24} {value:+.3f}")


if __name__ == "__main__":
    main()
