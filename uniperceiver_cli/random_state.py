"""The global random generators (torch's CPU one, Python's, numpy's) as tensors and plain values, so a checkpoint
that holds them loads with ``weights_only=True``; and back."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def global_rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
             "gauss": float(gauss)}
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Raises KeyError, TypeError, ValueError or RuntimeError on a state that is not one."""
    torch.set_rng_state(state["torch"])
    random.setstate(python_state(state["python"]))
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    np.random.set_state(numpy)  # a tuple in checkpoints written by older versions


def python_state(state: Any) -> tuple:
    """A ``random.Random`` state that travelled as lists (a DataLoader turns tuples into lists) as its tuple."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
