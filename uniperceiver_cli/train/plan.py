"""``uniperceiver recipes plan``: the predicted peak memory of one training process of a recipe, before launch.

Peak per process = model states (weights, gradients, optimizer state for the recipe's engine, precision and ZeRO
stage) + the largest task's step: the tensors its forward pass saves for the backward, traced by running the
model under :class:`~torch._subclasses.fake_tensor.FakeTensorMode` (shapes and dtypes only: nothing is
allocated, so the large model with the whole vocabulary traces on a laptop) + the largest of those tensors
again (its gradient, alive in the backward beside what is still saved) + a fixed allowance for the CUDA
context. The loader's batches are host memory, reported apart.

The trace runs the model's own methods (``classification_logits``, ``caption_logits``, ...) and the training
losses on fake batches shaped like the loader's, under CPU autocast for bf16/fp16 (CUDA autocast keeps a few
more ops in fp32; both halve the matmul outputs). What :class:`~uniperceiver_cli.train.tasks.TrainTask` decides
from the data is fixed to a stated size instead: texts at ``max_text_len`` (the loader pads to the batch's
longest), ``mask_probability`` of an MLM passage's tokens scored, a sampled target set of every batch token
plus ``negatives``. :func:`measure_step` runs the real ``TrainTask`` loss on real tensors to check the trace.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uniperceiver_cli.data.corpus import corpus_tokens
from uniperceiver_cli.data.shards import Manifest, split_source
from uniperceiver_cli.model.moe import ExpertLinear, Routing
from uniperceiver_cli.model.tokenizer import get_tokenizer
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.task_types import TASKS
from uniperceiver_cli.train.loop import share_workers
from uniperceiver_cli.train.losses import cross_entropy, retrieval_loss, router_loss
from uniperceiver_cli.train.optim import freeze_for_prompt_tuning
from uniperceiver_cli.train.recipe import Recipe, TaskSpec

GIB = 2**30
# CUDA context, cuBLAS/cuDNN workspaces and the allocator's rounding: not traced, a fixed allowance per process.
RUNTIME_ALLOWANCE = GIB
PREFETCH_FACTOR = 2  # torch DataLoader's default: batches each worker keeps ready
# Class counts of the shipped recipes' datasets, by the data folder's first component, for when the folder is
# not there to read the class names from; their names are assumed ASSUMED_NAME_TOKENS tokens long (the loader's
# tokenizer pads the set to its longest name).
KNOWN_CLASSES = {"imagenet21k": 21842, "imagenet": 1000, "kinetics700": 700, "kinetics400": 400, "mit": 339,
                 "vqa": 3129}  # VQA v2's answer set
ASSUMED_NAME_TOKENS = 16
DEFAULT_CLASSES = 1000
GPUS_IN_DESCRIPTION = re.compile(r"\bon (\d+) GPUs?\b")


# ------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModelStates:
    """Bytes per process of what the optimizer keeps between steps."""

    parameters: int  # elements held by this process (experts divided by expert parallelism)
    trainable: int  # of those, elements with gradients and optimizer state
    weights: int  # the model's weights and buffers (+ DeepSpeed fp16's fp32 master copy)
    gradients: int
    optimizer: int  # AdamW's two moments (+ ZeRO's fp32 partition of the weights)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


@dataclass(frozen=True)
class TaskPlan:
    """One task's step: what its forward saves for the backward, and its loader's host memory."""

    name: str
    type: str
    batch_size: int
    target_rows: int  # rows of its target set (class names, vocabulary); 0: in-batch (retrieval)
    encoded_rows: int  # of those, the rows this process encodes (train.split_targets)
    target_set: int  # bytes saved while encoding the target set
    activations: int  # bytes saved by the whole forward (the target set's included)
    backward: int  # on top in the backward: the largest saved tensor's gradient (+ a recomputed block)
    loader: int  # host bytes of its batches in flight (workers x prefetch + the one being used)
    notes: tuple[str, ...] = ()

    @property
    def peak(self) -> int:
        return self.activations + self.backward


@dataclass(frozen=True)
class RecipePlan:
    recipe: str
    gpus: int
    engine: str
    zero_stage: int
    precision: str
    split_targets: int
    states: ModelStates
    tasks: list[TaskPlan]
    runtime: int = RUNTIME_ALLOWANCE

    @property
    def largest(self) -> TaskPlan:
        return max(self.tasks, key=lambda t: t.peak)

    @property
    def total(self) -> int:
        """The predicted peak bytes on one GPU."""
        return self.states.total + self.largest.peak + self.runtime

    @property
    def host(self) -> int:
        """Host bytes per process of the loaders' batches (every task's loader runs at once)."""
        return sum(task.loader for task in self.tasks)

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= gpu_bytes


# ------------------------------------------------------------------------------------------------- model states


def default_gpus(recipe: Recipe) -> int:
    """The GPU count a shipped recipe names in its description ("... on 64 GPUs"), else 1."""
    found = GPUS_IN_DESCRIPTION.search(recipe.description)
    return int(found.group(1)) if found else 1


def _elements(model: torch.nn.Module, expert_parallel: int) -> tuple[int, int, int, int]:
    """(dense, dense trainable, expert, expert trainable) elements held by one process; buffers count as dense
    frozen weights. The experts of every MoE layer are divided by expert parallelism."""
    experts = {id(p) for m in model.modules() if isinstance(m, ExpertLinear) for p in m.parameters()}
    dense = trainable = expert = expert_trainable = 0
    for p in model.parameters():
        if id(p) in experts:
            expert += p.numel() // expert_parallel
            expert_trainable += p.numel() // expert_parallel if p.requires_grad else 0
        else:
            dense += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    dense += sum(b.numel() for b in model.buffers())
    return dense, trainable, expert, expert_trainable


def model_states(model: torch.nn.Module, recipe: Recipe, gpus: int) -> ModelStates:
    """Weights, gradients and AdamW state per process.

    ``single`` and DeepSpeed fp32/bf16 keep fp32 weights, fp32 gradients and two fp32 moments (bf16 is autocast).
    DeepSpeed fp16 keeps fp16 weights and gradients and an fp32 master copy beside the moments. ZeRO 1 divides
    the optimizer state (moments and ZeRO's fp32 partition of the weights) by the data-parallel size, ZeRO 2 the
    gradients too; expert parameters are divided over their expert-data-parallel group (gpus / expert_parallel).
    """
    engine = recipe.engine
    ep = engine.expert_parallel if engine.kind == "deepspeed" else 1
    dense, trainable, expert, expert_trainable = _elements(model, ep)
    deepspeed = engine.kind == "deepspeed"
    zero = engine.zero_stage if deepspeed else 0
    fp16 = deepspeed and recipe.train.precision == "fp16"
    dp, expert_dp = max(1, gpus), max(1, gpus // ep)
    train_elems = trainable + expert_trainable
    shard = trainable / dp + expert_trainable / expert_dp  # one process's partition under ZeRO
    weights = (2 if fp16 else 4) * (dense + expert)
    master = 0.0
    if fp16:
        master = 4 * (shard if zero else train_elems)
    elif zero:
        master = 4 * shard  # ZeRO's optimizer steps an fp32 partition even of fp32 weights
    gradients = (2 if fp16 else 4) * (shard if zero >= 2 else train_elems)
    if fp16 and zero == 1:
        gradients += 4 * shard  # the fp32 gradient of the partition, beside the full fp16 ones
    moments = 8 * (shard if zero else train_elems)
    return ModelStates(dense + expert, train_elems, int(weights), int(gradients), int(moments + master))


# ------------------------------------------------------------------------------------------------- saved tensors


class _Saved:
    """One packed tensor, held by the graph; weakly referenced by the tracker so what the graph drops is not
    counted (benchmarks/activation_memory.py)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


@dataclass
class SavedTracker:
    """Every tensor the forward saves for the backward, by phase ("target set", "step") and block call."""

    parameters: set[int]  # storages of the weights: kept either way, not activations
    phase: str = "step"
    block: int | None = None  # the block call running now (a running count of calls)
    calls: int = 0
    saved: list[tuple[weakref.ref, str, int | None]] = field(default_factory=list)

    def pack(self, tensor: torch.Tensor) -> _Saved:
        holder = _Saved(tensor)
        self.saved.append((weakref.ref(holder), self.phase, self.block))
        return holder

    def _enter(self) -> None:
        self.calls += 1
        self.block = self.calls

    @staticmethod
    def unpack(holder: _Saved) -> torch.Tensor:
        return holder.tensor

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before

    @contextlib.contextmanager
    def watching(self, model: UniPerceiver) -> Iterator[None]:
        """Tag what each block call saves with its index, to find the largest block."""
        handles = []
        for block in model.blocks:
            handles.append(block.register_forward_pre_hook(lambda *_: self._enter()))
            handles.append(block.register_forward_hook(lambda *_: setattr(self, "block", None)))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def totals(self) -> tuple[dict[str, int], int, int]:
        """Bytes by phase, the largest single block call's bytes and the largest single storage, counting each
        storage the graph still holds once (views share one), weights left out."""
        seen, phases, blocks, largest = set(self.parameters), {}, {}, 0
        for ref, phase, block in self.saved:
            holder = ref()
            if holder is None:
                continue
            key = storage_key(holder.tensor)
            if key in seen:
                continue
            seen.add(key)
            n = holder.tensor.untyped_storage().nbytes()
            phases[phase] = phases.get(phase, 0) + n
            if block is not None:
                blocks[block] = blocks.get(block, 0) + n
            largest = max(largest, n)
        return phases, max(blocks.values(), default=0), largest


def storage_key(tensor: torch.Tensor) -> int:
    """The identity of a tensor's storage (fake and meta storages all have data pointer 0)."""
    return tensor.untyped_storage()._cdata


# ------------------------------------------------------------------------------------------------- target sets


@dataclass(frozen=True)
class TargetSet:
    """A task's target set as the trace and the check use it: class-name token ids or vocabulary ids."""

    label_ids: torch.Tensor | None = None  # classification: (C, L) token ids of the class names
    label_padding: torch.Tensor | None = None
    vocab_rows: int = 0  # caption / MLM: rows of the vocabulary target set
    shared: bool = False  # the same set on every process (splittable by train.split_targets)
    note: str = ""


def target_set(spec: TaskSpec, recipe: Recipe, vocab_size: int) -> TargetSet:
    """The target set of a task: from its data folder where it is there (class names, corpus tokens), else the
    whole vocabulary or :data:`KNOWN_CLASSES` (noted)."""
    family = TASKS[spec.type].family
    directory = split_source(recipe.data_root, spec.data)
    manifest = _manifest(directory)
    if family in ("classification", "vqa"):  # class names, VQA answers: texts encoded each step
        if manifest is not None:
            ids, padding = get_tokenizer().encode_batch(manifest.label_names(spec.label_set))
            return TargetSet(ids, padding, shared=True)
        count = KNOWN_CLASSES.get(Path(spec.data).parts[0], DEFAULT_CLASSES)
        ids = torch.randint(1, vocab_size, (count, ASSUMED_NAME_TOKENS))
        return TargetSet(ids, torch.zeros_like(ids, dtype=torch.bool), shared=True,
                         note=f"{count} {'answers' if family == 'vqa' else 'classes'} of {ASSUMED_NAME_TOKENS} "
                              f"tokens assumed (no data)")
    if family == "text_classification":  # the label words, each a vocabulary row
        words = len(manifest.label_names(spec.label_set)) if manifest is not None else 2
        return TargetSet(vocab_rows=words, note="" if manifest is not None else "2 label words assumed (no data)")
    if family not in ("caption", "mlm"):
        return TargetSet()
    if spec.vocabulary == "full":
        return TargetSet(vocab_rows=vocab_size, shared=True)
    if spec.vocabulary == "corpus":
        if manifest is not None:
            return TargetSet(vocab_rows=len(corpus_tokens(directory, manifest)), shared=True)
        return TargetSet(vocab_rows=vocab_size, shared=True, note="corpus unknown (no data): whole vocabulary")
    tokens = spec.batch_size * spec.max_text_len if family == "caption" else _masked(spec)
    return TargetSet(vocab_rows=min(vocab_size, tokens + spec.negatives + 1),
                     note="sampled: every batch token assumed distinct")


def _manifest(directory: str | Path) -> Manifest | None:
    try:
        return Manifest.load(directory)
    except (FileNotFoundError, ValueError):
        return None


def _masked(spec: TaskSpec) -> int:
    """MLM positions scored per batch: the masking rate of a full passage (the real count varies per batch)."""
    return max(1, round(spec.mask_probability * spec.batch_size * (spec.max_text_len - 1)))


@dataclass(frozen=True)
class _FakeSplit:
    """:class:`~uniperceiver_cli.parallel.targets.TargetSplit` without processes: encode this process's slice
    and stand the gathered whole in for the all-gather (which saves nothing for the backward)."""

    world_size: int
    min_rows: int

    def applies(self, rows: int) -> bool:
        return self.world_size > 1 and self.min_rows > 0 and rows >= self.min_rows

    def encode(self, encode: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
        n = rows[0].shape[0]
        if not self.applies(n):
            return encode(*rows)
        per = -(-n // self.world_size)
        features = encode(*(r[:per] for r in rows))
        return torch.cat([features] * self.world_size)[:n]


# ------------------------------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepShape:
    """The sizes of one task's batch, as the loader gives it."""

    batch: int
    image_size: int
    frames: int
    text_len: int


def _batch(spec: TaskSpec, shape: StepShape, vocab_size: int, answers: int = 0) -> dict[str, torch.Tensor]:
    """A batch of the loader's shapes: int64 ids, bool padding, and pixels as the step sees them on the device,
    float32 and normalised (the loader's uint8 pixels, converted and erased before anything is saved for the
    backward: the pixels need no gradient); VQA: scores over ``answers`` answers."""
    kind, b, s = TASKS[spec.type], shape.batch, shape.image_size
    batch: dict[str, torch.Tensor] = {}
    if kind.modality == "image":
        batch["images"] = torch.randn(b, 3, s, s)
    elif kind.modality == "video":
        batch["videos"] = torch.randn(b, shape.frames, 3, s, s)
    if kind.family in ("classification", "text_classification", "vqa"):
        batch["labels"] = torch.randint(0, 2, (b,))
    if kind.family != "classification":
        batch["text_ids"] = torch.randint(1, vocab_size, (b, shape.text_len))
        batch["text_padding"] = torch.zeros(b, shape.text_len, dtype=torch.bool)
    if kind.family in ("text_classification", "vqa"):
        batch["slots"] = torch.randint(0, shape.text_len, (b,))
    if kind.family == "vqa":
        batch["answer_scores"] = torch.zeros(b, answers).scatter_(1, batch["labels"][:, None], 1.0)
    return batch


def _loss(model: UniPerceiver, spec: TaskSpec, batch: dict[str, torch.Tensor], targets: TargetSet,
          split: _FakeSplit, tracker: SavedTracker) -> torch.Tensor:
    """The task's loss as :meth:`TrainTask._loss` computes it, with the data-dependent sizes fixed (module doc)."""
    family = TASKS[spec.type].family
    visual = batch.get("videos", batch.get("images"))
    if family == "classification":
        with tracker.during("target set"):
            features = split.encode(model.encode_text, targets.label_ids, targets.label_padding)
        logits = model.classification_logits(visual, features)
        classes = features.shape[0]
        target = (torch.full((visual.shape[0], classes), 1 / classes) if spec.mixup is not None
                  else batch["labels"])  # Mixup's soft targets: (B, C)
        return cross_entropy(logits, target, spec.label_smoothing)
    if family == "retrieval":
        return retrieval_loss(model.retrieval_logits(visual, batch["text_ids"], batch["text_padding"]),
                              spec.label_smoothing)
    if family == "vqa":
        with tracker.during("target set"):
            features = split.encode(model.answer_features, targets.label_ids, targets.label_padding)
        logits = model.vqa_logits(visual, batch["text_ids"], batch["text_padding"], batch["slots"], features)
        return cross_entropy(logits, batch["labels"], spec.label_smoothing)
    ids = torch.randint(0, model.config.vocab_size, (targets.vocab_rows,))
    with tracker.during("target set"):
        encode = split.encode if spec.vocabulary != "sampled" else (lambda f, *r: f(*r))
        vocabulary = encode(lambda rows: model.vocabulary_targets(rows), ids)
    if family == "caption":
        text = batch["text_ids"]
        logits = model.caption_logits(visual, text, batch["text_padding"], vocabulary)
        target = torch.randint(0, targets.vocab_rows, text.shape)
        return cross_entropy(logits.flatten(0, 1), target.flatten(), spec.label_smoothing)
    # MLM: mlm_logits with the M scored positions gathered by index (a boolean mask has a data-dependent size)
    text, padding = batch["text_ids"], batch["text_padding"]
    out = model.encode_text_tokens(text, padding, routing=Routing(("text_input",)), side="input")
    count = text.shape[0] if family == "text_classification" else _masked(spec)  # one slot per prompt
    scored = torch.randint(0, text.shape[0] * (text.shape[1] - 1), (count,))
    query = model.head.project(out[:, 1:].flatten(0, 1)[scored])
    logits = model.head.logits(query, vocabulary, "text_mlm")
    return cross_entropy(logits, torch.randint(0, targets.vocab_rows, (scored.shape[0],)), spec.label_smoothing)


def _rows(targets: TargetSet) -> int:
    """The rows of a target set: class names or answers, else vocabulary rows."""
    return targets.label_ids.shape[0] if targets.label_ids is not None else targets.vocab_rows


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    """CPU autocast in the recipe's half type (fp16 and bf16 tensors take the same bytes)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


@contextlib.contextmanager
def _fixed_time_offset(model: UniPerceiver) -> Iterator[None]:
    """Training draws the temporal-table offset with ``int(torch.randint(...))``, a host read that fake tensors
    cannot answer; the offset changes no shape, so the trace uses 0."""
    model.embed_visual = lambda video: model.embed_norm(model.visual_embed(video, 0))
    try:
        yield
    finally:
        del model.embed_visual


def _trace(model: UniPerceiver, recipe: Recipe, spec: TaskSpec, targets: TargetSet, split: _FakeSplit
           ) -> tuple[dict[str, int], int, int]:
    """Trace one task's forward on fake tensors: bytes by phase, largest block, largest tensor."""
    config = model.config
    shape = StepShape(spec.batch_size, config.image_size, spec.num_frames, spec.max_text_len)
    tracker = SavedTracker({storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()})
    batch = _batch(spec, shape, config.vocab_size, _rows(targets))
    with tracker.watching(model), _autocast(recipe.train.precision), model.routing_task(spec.name), \
            model.router_log() as routed:
        loss = _loss(model, spec, batch, targets, split, tracker)
        stats = routed.stats()
        if stats is not None:  # token and context routing add their router losses, as the loop does
            loss = loss + router_loss(stats, recipe.train.moe_balance_weight, recipe.train.moe_z_weight)
    result = tracker.totals()
    del loss
    return result


def _loader_bytes(spec: TaskSpec, recipe: Recipe, image_size: int) -> int:
    """Host bytes of one task's batches in flight: each worker's prefetched batches and the one in use."""
    kind = TASKS[spec.type]
    b = spec.batch_size
    pixels = b * 3 * image_size**2 * (spec.num_frames if kind.modality == "video" else 1)  # uint8 (data/loader.py)
    text = b * spec.max_text_len * 9 if kind.family != "classification" else 0  # int64 + bool
    batch = (pixels if kind.modality in ("image", "video") else 0) + text + b * 8
    workers = share_workers(recipe.train.num_workers, {t.name: t.sampling_weight for t in recipe.tasks})[spec.name]
    return batch * (workers * PREFETCH_FACTOR + 1)


def plan_task(model: UniPerceiver, recipe: Recipe, spec: TaskSpec, targets: TargetSet, gpus: int) -> TaskPlan:
    """One task's step on fake tensors; ``model`` was built under the active FakeTensorMode, ``targets`` outside
    it (the tokenizer reads its lengths back)."""
    split = _FakeSplit(gpus, recipe.train.split_targets)
    rows = _rows(targets)
    encoded = -(-rows // gpus) if targets.shared and split.applies(rows) else rows
    phases, block, largest = _trace(model, recipe, spec, targets, split)
    backward = largest
    if model.activation_checkpointing:  # the backward runs one block again with its intermediates
        model.activation_checkpointing = False
        backward += _trace(model, recipe, spec, targets, split)[1]
        model.activation_checkpointing = True
    notes = (targets.note,) if targets.note else ()
    return TaskPlan(spec.name, spec.type, spec.batch_size, rows, encoded, phases.get("target set", 0),
                    sum(phases.values()), backward, _loader_bytes(spec, recipe, model.config.image_size), notes)


def fake_model(recipe: Recipe) -> UniPerceiver:
    """The recipe's model as :func:`~uniperceiver_cli.train.loop.build_model` makes it (prompt tuning frozen,
    activation checkpointing set), in training mode, with fake weights; ``init`` is not read (same shapes)."""
    model = UniPerceiver(recipe.model_config()).train()
    model.activation_checkpointing = recipe.train.activation_checkpointing
    if recipe.stage == "prompt-tune":
        freeze_for_prompt_tuning(model)
    return model


def plan_recipe(recipe: Recipe, gpus: int | None = None) -> RecipePlan:
    """The predicted peak memory per process of ``recipe`` on ``gpus`` processes (default: :func:`default_gpus`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gpus = gpus or default_gpus(recipe)
    vocab_size = recipe.model_config().vocab_size
    targets = [target_set(spec, recipe, vocab_size) for spec in recipe.tasks]
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = fake_model(recipe)
        with _fixed_time_offset(model):
            tasks = [plan_task(model, recipe, spec, t, gpus) for spec, t in zip(recipe.tasks, targets, strict=True)]
        states = model_states(model, recipe, gpus)
    return RecipePlan(recipe.name, gpus, recipe.engine.kind, recipe.engine.zero_stage, recipe.train.precision,
                      recipe.train.split_targets, states, tasks)


# ------------------------------------------------------------------------------------------------- the check


def measure_step(recipe: Recipe, index: int, seed: int = 0) -> dict[str, int]:
    """What a real step of task ``index`` saves, on real CPU tensors: the real :class:`TrainTask` loss on a batch
    of the plan's shapes (one process, fp32 or CPU autocast as planned). Bytes by phase ("step" only: the real
    loss has no phases), for comparison with :attr:`TaskPlan.activations`."""
    from uniperceiver_cli.train.tasks import TrainTask

    torch.manual_seed(seed)
    spec = recipe.tasks[index]
    model = fake_model(recipe)
    targets = target_set(spec, recipe, model.config.vocab_size)
    task = TrainTask(spec, TASKS[spec.type], split_source(recipe.data_root, spec.data), None)  # no manifest read
    if targets.label_ids is not None:
        task.class_names = [str(i) for i in range(targets.label_ids.shape[0])]
        task._label_text = (targets.label_ids, targets.label_padding)
    elif TASKS[spec.type].family == "text_classification":  # the label words
        task.vocab_ids = torch.randperm(model.config.vocab_size)[:targets.vocab_rows]
    elif targets.vocab_rows and spec.vocabulary == "corpus":
        task.vocab_ids = torch.randperm(model.config.vocab_size)[:targets.vocab_rows].sort().values
    shape = StepShape(spec.batch_size, model.config.image_size, spec.num_frames, spec.max_text_len)
    batch = _batch(spec, shape, model.config.vocab_size, _rows(targets))
    tracker = SavedTracker({storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()})
    with tracker.watching(model), _autocast(recipe.train.precision):
        loss, _ = task.loss(model, batch, torch.Generator().manual_seed(seed))
    phases, _, largest = tracker.totals()
    del loss
    return {"activations": sum(phases.values()), "largest": largest}


def gib(n: float) -> float:
    return n / GIB


def within(planned: int, measured: int, tolerance: float) -> bool:
    """Whether ``planned`` is within ``tolerance`` (a fraction) of ``measured``."""
    return math.isclose(planned, measured, rel_tol=tolerance)
