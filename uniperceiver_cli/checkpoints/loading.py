"""A located source's weights (:mod:`.sources`) into a model: the model config (a bundle's, the run's, inferred or
given), every key and shape checked before the model is built, and the provenance an export records."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from uniperceiver_cli.checkpoints.bundle import check_preprocessing, read_bundle, read_safetensors
from uniperceiver_cli.checkpoints.errors import CheckpointError, CheckpointWarning
from uniperceiver_cli.checkpoints.official import convert_official, infer_config, preset_of
from uniperceiver_cli.checkpoints.runs import read_model_config, run_recipe
from uniperceiver_cli.checkpoints.sources import Source, find_source, sha256_of
from uniperceiver_cli.model.config import ModelConfig, get_config, trained_config
from uniperceiver_cli.model.uniperceiver import Targets, UniPerceiver
from uniperceiver_cli.version import __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

    from uniperceiver_cli.model.tokenizer import Tokenizer


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (a, b) vs model (c, d)"
    dropped: list[str] = field(default_factory=list)  # official keys the model does not use, by design

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 4) -> str:
        groups = (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.mismatched))
        return "; ".join(f"{len(names)} {label} key(s): " + ", ".join(names[:limit])
                         + (f" and {len(names) - limit} more" if len(names) > limit else "")
                         for label, names in groups if names)


@dataclass
class Weights:
    """A source's weights in our names, with what the model config and provenance need."""

    state: dict[str, torch.Tensor]
    config: ModelConfig | None = None  # a bundle's, the run's (model.json, else config.yaml); None: infer
    targets: Targets = field(default_factory=Targets)
    unknown: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    recipe: str | None = None
    provenance: dict[str, Any] | None = None  # a bundle's own


def read_weights(source: Source, fold_video_type: bool | None = None) -> Weights:
    """The weights of a located source, mapped onto our names (official files only; ours are never renamed)."""
    recipe = run_recipe(source.run_dir)
    name = recipe.get("name") if isinstance(recipe.get("name"), str) else None
    if source.kind == "bundle":
        config, state, targets, previous = read_bundle(source.path)
        if name is None and isinstance(previous, dict):
            name = previous.get("recipe")
        return Weights(state, config, targets, recipe=name, provenance=previous)
    if source.kind == "official":
        state, unknown, dropped = convert_official(source.state, source.format, fold_video_type)
        return Weights(state, unknown=unknown, dropped=dropped)
    config = read_model_config(source.run_dir)
    model = recipe.get("model")
    if config is None and isinstance(model, dict) and model.get("preset"):  # a run written before model.json
        names = [t.get("name") for t in recipe.get("tasks") or [] if isinstance(t, dict)]
        try:
            config = trained_config(model["preset"], model.get("overrides") or {}, names)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the model of {source.run_dir / 'config.yaml'} is not a valid config: "
                                  f"{' '.join(str(e).split())}") from None
    return Weights(dict(source.state), config, recipe=name)


def _our_config(state: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    """The config of our-named weights without a recipe: a preset of exactly these shapes, else refused (the
    head count, image size and other fields cannot be read from the weights)."""
    try:
        config = infer_config(state)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot tell the model config of {path} from its weights ({e}); give --preset") \
            from None
    if preset_of(config.width, config.layers, config.mlp_dim, config.moe is not None) is not None:
        return config  # infer_config took that preset's head count and other fields
    raise CheckpointError(f"{path} has no model.json or config.yaml next to its checkpoints/ and its shapes (width "
                          f"{config.width}, {config.layers} layers, MLP {config.mlp_dim}) match no preset; give "
                          f"--preset")


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    """Missing, unexpected and mis-shaped keys of ``state`` against ``model``."""
    expected = model.state_dict()
    return LoadReport(missing=sorted(set(expected) - set(state)), unexpected=sorted(set(state) - set(expected)),
                      mismatched=sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape))


def _report(model: torch.nn.Module, weights: Weights, path: Path, strict: bool) -> LoadReport:
    """:func:`check_state`, with the official keys not recognised as unexpected and those dropped by design; with
    ``strict`` weights that do not fit raise."""
    report = check_state(model, weights.state)
    report.unexpected = sorted(report.unexpected + weights.unknown)
    report.dropped = weights.dropped
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {report.summary()}")
    return report


def _apply(model: UniPerceiver, weights: Weights, path: Path, strict: bool) -> LoadReport:
    """Load the weights that fit into ``model`` and set their targets on it."""
    report, state = _report(model, weights, path, strict), weights.state
    bad = {m.split(":")[0] for m in report.mismatched}
    usable = {k: v for k, v in state.items() if k not in bad and k not in report.unexpected}
    expected = model.state_dict()
    relabelled = [k for k, v in usable.items() if expected[k].is_floating_point() and not v.is_floating_point()]
    if relabelled:  # load_state_dict would convert integers into the float weights without a word
        raise CheckpointError(f"checkpoint {path}: tensor {relabelled[0]} is {usable[relabelled[0]].dtype}, not a "
                              f"floating-point dtype a weight takes ({len(relabelled)} such tensor(s))")
    _warn_non_finite(usable, path)
    model.load_state_dict(usable, strict=False)
    weights.targets.apply(model)
    return report


def _warn_non_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """NaN or infinite weights load without error but make every output meaningless (chance accuracy)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(f"checkpoint {path}: {len(bad)} of {len(state)} tensors hold NaN or infinite values "
                      f"({shown}); the model's outputs will be meaningless", CheckpointWarning, stacklevel=2)


def load_checkpoint(model: UniPerceiver, path: str | Path, *, strict: bool = True,
                    fold_video_type: bool | None = None) -> LoadReport:
    """Load any checkpoint :func:`load_model` accepts (or a bare ``.safetensors`` file) into ``model``.

    With ``strict`` (the default) any missing, unexpected or mis-shaped key raises a one-line
    :class:`CheckpointError` naming them; otherwise the fitting tensors are loaded and the report says
    what was left out. A bundle also sets what its weights were trained over (``model.class_names``,
    ``model.caption_vocabulary``); any other file records neither, so both become None.
    """
    path = Path(path)
    if path.suffix == ".safetensors":  # the weights alone: no targets
        return _apply(model, Weights(read_safetensors(path)), path, strict)
    source = find_source(path)
    weights = read_weights(source, fold_video_type)
    if weights.config is not None and weights.config.folded and not model.config.folded:
        raise CheckpointError(f"{source.path} holds a model with folded experts, and a folded model is for "
                              f"inference only: it loads only as itself (load_model); train from the unfolded model")
    return _apply(model, weights, source.path, strict)


def model_config(source: Source, weights: Weights, preset: str | ModelConfig | None = None,
                 **overrides: object) -> ModelConfig:
    """The model config of a source: ``preset`` and overrides when given, else the bundle's or the run's
    recorded one, else inferred from the weights' shapes."""
    if preset is not None:
        return get_config(preset, **overrides)
    if weights.config is None and source.kind == "official":
        try:
            return infer_config(weights.state, **overrides)
        except KeyError as e:
            raise CheckpointError(f"{source.weights} lacks {e.args[0]}, needed to infer the model's shape") from e
    config = weights.config if weights.config is not None else _our_config(weights.state, source.weights)
    return get_config(config, **overrides) if overrides else config


def _check_fits(source: Source, weights: Weights, config: ModelConfig, strict: bool) -> None:
    """Refuse, before any memory is allocated for it, a model ``config`` describes that the weights cannot fill: a
    config (a bundle's ``config.json`` or a run's ``model.json`` is a file a user may be handed) with more layers
    than the weights hold, or more parameters (counted on the ``meta`` device, which allocates nothing); with
    ``strict`` any key or shape that does not fit, as :func:`load_checkpoint` reports it."""
    held = len({key.split(".")[1] for key in weights.state if key.startswith("blocks.")})
    if config.layers > held:
        raise CheckpointError(f"checkpoint {source.path} does not fit the model: the config has {config.layers} "
                              f"layers, the weights {held}")
    try:
        with torch.device("meta"):
            shapes = UniPerceiver(config)
    except (ValueError, TypeError, RuntimeError) as e:  # torch's RuntimeError for impossible sizes
        raise CheckpointError(f"the config of {source.path} does not build a model: {' '.join(str(e).split())}") from e
    _report(shapes, weights, source.path, strict)
    needed = sum(t.numel() for t in shapes.state_dict().values())
    have = sum(t.numel() for t in weights.state.values())
    if needed > have:
        raise CheckpointError(f"checkpoint {source.path} does not fit the model: the config describes {needed:,} "
                              f"parameters, more than the {have:,} the weights hold")


def build_model(source: Source, weights: Weights, config: ModelConfig, strict: bool = True) -> UniPerceiver:
    """The model of ``config`` holding the source's weights (strict: every key and shape must fit). It is built only
    once the config is known to fit the weights (never larger than they are, even when not ``strict``)."""
    _check_fits(source, weights, config, strict)
    model = UniPerceiver(config)
    _apply(model, weights, source.path, strict)
    return model.eval()


def load_model(path: str | Path | Source, *, preset: str | None = None, strict: bool = True,
               fold_video_type: bool | None = None, kind: str | None = None, step: int | None = None,
               latest: bool = False, **overrides: object) -> UniPerceiver:
    """A model built from a checkpoint of any kind :func:`find_source` accepts (a bundle, a run directory, a
    training checkpoint of either engine, an official file). A bundle carries its config, a run its ``model.json``
    (older runs: ``config.yaml``); otherwise the config is inferred from the weights' shapes (or given by ``preset``
    and field overrides). A config whose model the weights cannot fill is refused before it is allocated."""
    source = path if isinstance(path, Source) else find_source(path, kind=kind, step=step, latest=latest)
    weights = read_weights(source, fold_video_type)
    return build_model(source, weights, model_config(source, weights, preset, **overrides), strict)


class ModelAndTransforms(NamedTuple):
    """What :func:`load_model_and_transforms` returns; it unpacks as a 4-tuple."""

    model: UniPerceiver
    image_transform: Callable[[Image.Image], torch.Tensor]  # a PIL image -> (3, S, S)
    video_transform: Callable[[torch.Tensor], torch.Tensor]  # uint8 frames (T, H, W, 3) -> views (V, T, 3, S, S)
    tokenizer: Tokenizer


def load_model_and_transforms(src: str | Path, *, task: str = "classification", num_crops: int = 3,
                              **kwargs: Any) -> ModelAndTransforms:
    """The model of ``src`` (anything :func:`load_model` takes, with its keyword arguments) with the evaluation
    transforms and the tokenizer it expects: the image transform for ``task`` ("classification", or "caption" and
    "retrieval", which resize the short side straight to the image size) and the video transform with ``num_crops``
    views, at the image size the bundle records (a bundle whose recorded preprocessing differs from the reference's
    is refused), else the config's."""
    from uniperceiver_cli.model.preprocess import image_transform, video_transform
    from uniperceiver_cli.model.tokenizer import get_tokenizer

    source = find_source(src, kind=kwargs.pop("kind", None), step=kwargs.pop("step", None),
                         latest=kwargs.pop("latest", False))
    model = load_model(source, **kwargs)
    if source.kind == "bundle":
        check_preprocessing(source.path, model.config)
    return ModelAndTransforms(model, image_transform(model.config, task), video_transform(model.config, num_crops),
                              get_tokenizer())


def source_provenance(source: Source, weights: Weights) -> dict[str, Any]:
    """What ``config.json`` records about where exported weights came from."""
    record: dict[str, Any] = {"source": str((source.given or source.path).resolve()), "kind": source.kind,
                              "file": str(source.weights.resolve()), "sha256": sha256_of(source.weights),
                              "step": source.step, "recipe": weights.recipe, "toolkit_version": __version__}
    if source.zero_stage is not None:
        record.update(zero_stage=source.zero_stage, processes=source.processes)
    if weights.provenance is not None:
        record["previous"] = weights.provenance
    return record
