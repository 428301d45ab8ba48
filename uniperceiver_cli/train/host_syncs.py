"""What a step makes a GPU's host wait for, counted on any device, the CPU included.

On a GPU the host runs ahead of the device until an operation needs a value the device has not computed yet (a
``.item()``, an output shape that depends on the data) or copies pageable host memory to it. None of that shows
on a CPU, where every tensor is in host memory. :class:`HostSyncCensus` finds them anyway:

- **Device syncs**, at the ATen level (a :class:`TorchDispatchMode`, so what composite operations and the backward
  run inside is seen too): ``_local_scalar_dense`` (``.item()``, ``bool()``, ``int()`` of a tensor),
  ``nonzero``, the ``unique`` family, boolean-mask indexing and ``masked_select``, ``repeat_interleave`` with
  tensor repeats. Operations on host tensors only are not counted: they cost the device nothing.
- **Host-to-device copies**, at the Python level (a :class:`TorchFunctionMode`), by following where each tensor
  would live on a GPU: tensors made without a ``device`` (``torch.tensor(...)``, ``torch.arange(n)``) and the
  ones computed only from such are in host memory; everything else (parameters, buffers, what a ``device=``
  factory or a ``.to(device)`` makes) is on the device. Counted: a ``.to(device)``/``.cuda()`` of a host tensor
  (except a batch tensor given as pinned, moved with ``non_blocking=True``), a ``device=`` tensor built from
  Python data, a host tensor of more than one element used in a device operation, and a device tensor read back
  (``.cpu()``, ``.tolist()``, ``.numpy()``).

Each count keeps where in this package it happened (file:line), so a census says what to fix.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from uniperceiver_cli.data.loader import to_device

aten = torch.ops.aten
PACKAGE = str(Path(__file__).resolve().parents[1])
HERE = str(Path(__file__).resolve())
SYNC_OPS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.nonzero_static.default: None,  # a fixed output size: no sync
    aten.argwhere.default: "nonzero",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.masked_select.default: "boolean indexing",
    aten.repeat_interleave.Tensor: "repeat_interleave",
}
BOOLEAN_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
READ_BACK = {torch.Tensor.cpu: "read back", torch.Tensor.tolist: "read back", torch.Tensor.numpy: "read back"}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
ASYNC_MOVES = {to_device}  # through pinned memory
FROM_DATA = {torch.tensor, torch.as_tensor}


def _where() -> str:
    """The innermost frame of this package outside this module, as ``path:line``."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE) and name != HERE:
            return f"{Path(name).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno}"
        frame = frame.f_back
    return "outside the package"


def _tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    return [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]


def _moves(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to``/``cuda`` call names a device (not only a dtype)."""
    if func is torch.Tensor.cuda:
        return True
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])


class HostSyncCensus:
    """Counts, inside ``with census:``, what would make a GPU's host wait (see the module docstring).

    ``pinned``: tensors in pinned host memory (a training batch on a GPU run); their ``non_blocking`` copies are
    asynchronous, so not counted. ``counts`` maps a kind to its number, ``places`` a ``kind @ file:line`` to its.
    """

    def __init__(self, pinned: list[torch.Tensor] = ()) -> None:
        self.counts: Counter[str] = Counter()
        self.places: Counter[str] = Counter()
        self._host: dict[int, weakref.ref] = {}  # by id, checked by identity (a tensor's == is elementwise)
        self._pinned: dict[int, weakref.ref] = {}
        for tensor in pinned:
            self.mark(tensor, pinned=True)
        self._on_host = False
        self.counting = True  # False: follow where tensors live (a warm-up step's caches) without counting
        self._modes = (_Functions(self), _Dispatches(self))

    def __enter__(self) -> HostSyncCensus:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def count(self, kind: str) -> None:
        if not self.counting:
            return
        self.counts[kind] += 1
        self.places[f"{kind} @ {_where()}"] += 1

    def mark(self, tensor: torch.Tensor, pinned: bool = False) -> None:
        """Note that ``tensor`` is in host memory (pinned: page-locked)."""
        self._host[id(tensor)] = weakref.ref(tensor)
        if pinned:
            self._pinned[id(tensor)] = weakref.ref(tensor)

    def on_host(self, tensor: torch.Tensor, pinned: bool = False) -> bool:
        ref = (self._pinned if pinned else self._host).get(id(tensor))
        return ref is not None and ref() is tensor


class _Functions(TorchFunctionMode):
    """Follows where tensors live; counts copies between host and device."""

    def __init__(self, census: HostSyncCensus) -> None:
        super().__init__()
        self.census = census

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        census = self.census
        inputs = _tensors(args, kwargs)
        host = [t for t in inputs if census.on_host(t)]
        device = [t for t in inputs if not census.on_host(t)]
        result_on_host = False
        if func in ASYNC_MOVES:
            pass  # the result is on the device
        elif func in MOVES and inputs and census.on_host(inputs[0]) and _moves(func, args, kwargs):
            if not (census.on_host(inputs[0], pinned=True) and kwargs.get("non_blocking")):
                census.count("host-to-device copy")
        elif func in READ_BACK and device:
            census.count("device-to-host copy")
        elif func in FROM_DATA and not device:  # Python data or host tensors
            if kwargs.get("device") is not None:
                census.count("host-to-device copy")
            else:
                result_on_host = True
        elif not inputs:  # a factory: on the host unless it names a device
            result_on_host = kwargs.get("device") is None
        elif not device:
            result_on_host = not (func in MOVES and _moves(func, args, kwargs))
        elif any(t.numel() > 1 for t in host):
            census.count("host tensor in a device operation")
        census._on_host, before = result_on_host and not device, census._on_host
        try:
            result = func(*args, **kwargs)
        finally:
            census._on_host = before
        if isinstance(result, torch.Tensor) and func in MOVES | ASYNC_MOVES and result is inputs[0] \
                and not result_on_host:
            result = result.view(result.shape)  # on the CPU a move returns its input: a new object, on the device
        if result_on_host or func in READ_BACK:
            for tensor in _tensors(result, None):
                census.mark(tensor)
        return result


class _Dispatches(TorchDispatchMode):
    """Counts the ATen operations that wait for the device."""

    def __init__(self, census: HostSyncCensus) -> None:
        super().__init__()
        self.census = census

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.census._on_host:
            kind = SYNC_OPS.get(func)
            if func in BOOLEAN_INDEX_OPS:
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(i is not None and i.dtype == torch.bool for i in indices):
                    kind = "boolean indexing"
            if kind:
                self.census.count(kind)
        return func(*args, **kwargs)
