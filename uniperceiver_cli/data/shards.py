"""WebDataset shards: the sample format, the writer (resumable, parallel) and the per-split manifest.

A converted data set split is one folder::

    DIR/shard-000000.tar ... shard-NNNNNN.tar   WebDataset tars
    DIR/shard-000000.json ...                   per-shard stats: samples, skips, sample keys, members, labels
    DIR/manifest.json                           what the split holds (see :class:`Manifest`)

A sample in a tar is a group of files sharing a key: ``jpg``/``png`` image bytes, a video container
(``mp4``, ``avi``, ``webm``, ``mkv``, ``mov``), ``txt`` (the text: a caption or a corpus passage),
``cls`` (the class index as decimal text) and ``json`` (``id``, ``captions`` for several captions,
``label`` name, ``source`` path, anything else the converter keeps).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tarfile
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from uniperceiver_cli.text_files import parse_json, read_json

FORMAT = "uniperceiver-shards"
MANIFEST = "manifest.json"
IMAGE_EXTS = ("jpg", "png")
VIDEO_EXTS = ("mp4", "avi", "webm", "mkv", "mov")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # the image files read
VIDEO_SUFFIXES = tuple(f".{ext}" for ext in VIDEO_EXTS)
MAX_SKIP_EXAMPLES = 100
SHARD_NAME = re.compile(r"shard-[0-9]{6,}\.tar")  # what write_shards names a shard: a file in the split's folder
STREAMING_ENV = "UNIPERCEIVER_STREAMING"  # "1": shard URLs and pipes may be opened
STREAM_TIMEOUT_ENV = "UNIPERCEIVER_STREAM_TIMEOUT"  # seconds, overrides make_loader's stream_timeout
STREAM_TIMEOUT = 60.0  # seconds an http(s) shard may stall (connecting or between reads)
MAX_MANIFEST = 64 << 20  # bytes of a fetched manifest.json (a local one is read within read_json's limit)
_FETCHED: dict[str, bytes] = {}  # manifest URL -> the bytes fetched by this process


class Skip(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a sample maker: the sample is left out and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Sample:
    """One sample before it is written. Exactly the fields that are set become tar members."""

    key: str
    image: bytes | None = None
    image_ext: str = "jpg"
    video: bytes | None = None
    video_ext: str = "mp4"
    text: str | None = None
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def members(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for kind, data, ext, allowed in (("image", self.image, self.image_ext, IMAGE_EXTS),
                                         ("video", self.video, self.video_ext, VIDEO_EXTS)):
            if data is not None:
                if ext not in allowed:
                    raise ValueError(f"{kind} extension must be one of {allowed}, got {ext!r}")
                out[ext] = data
        if self.text is not None:
            out["txt"] = self.text.encode("utf-8")
        if self.label is not None:
            out["cls"] = str(int(self.label)).encode()
        if self.meta:
            out["json"] = json.dumps(self.meta, ensure_ascii=False).encode("utf-8")
        return out


@dataclass
class ShardInfo:
    file: str
    samples: int
    bytes: int


@dataclass
class Manifest:
    dataset: str
    split: str
    modality: str  # "image", "video" or "text"
    tasks: list[str]
    source: str
    num_samples: int = 0
    classes: list[str] | None = None  # class names, index = label; the classification target set
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_examples: list[dict[str, str]] = field(default_factory=list)  # the first few, with details
    extra: dict[str, Any] = field(default_factory=dict)  # converter-specific facts (e.g. captions count)
    format: str = FORMAT
    version: int = 1

    def save(self, directory: Path) -> Path:
        path = directory / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """The manifest of a split folder (or of its ``manifest.json``), or of a split URL (:func:`is_split_url`,
        fetched with streaming enabled); a one-line ValueError on an invalid one."""
        if isinstance(path, str) and is_split_url(path):
            return cls.parse(fetch_manifest(path), f"{path.rstrip('/')}/{MANIFEST}")
        path = Path(path)
        folder = path.parent if path.name == MANIFEST else path
        if path.is_dir():
            path = path / MANIFEST
        if path.name != MANIFEST or not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST} at {folder}: run `uniperceiver prepare-data` first")
        return cls.parse(read_json(path, "shard manifest"), str(path))

    @classmethod
    def parse(cls, data: Any, where: str) -> Manifest:
        """A manifest from its JSON data; a one-line ValueError naming ``where`` on an invalid one."""
        try:
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            for shard in data["shards"]:
                if not isinstance(shard.file, str) or not SHARD_NAME.fullmatch(shard.file):
                    raise ValueError(f"shard {str(shard.file)[:300]!r} is not a shard-NNNNNN.tar file of its folder")
            return cls(**data)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{where} is not a valid shard manifest: {' '.join(str(e).split())[:1000]}") from None

    def label_names(self, label_set: str | None = None) -> list[str]:
        """Class names, index = label: those of ``label_set`` (``extra["label_sets"]``), else ``classes``."""
        if label_set is not None:
            sets = self.extra.get("label_sets", {})
            if label_set not in sets:
                raise ValueError(f"label set {label_set!r} is not in {self.dataset}/{self.split}; "
                                 f"it has: {', '.join(sets) or 'none'}")
            return list(sets[label_set])
        if not self.classes:
            raise ValueError(f"{self.dataset}/{self.split} names no classes; give the class names")
        return list(self.classes)

    def shard_paths(self, directory: Path) -> list[str]:
        return [str(shard_path(directory, s.file)) for s in self.shards]


SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # a URL scheme; one letter would be a Windows drive


def is_remote(source: str) -> bool:
    """Whether a shard source is a URL or pipe (``pipe:``, ``http://``, ``s3://``, any ``scheme:``), not a path."""
    return SCHEME.match(source) is not None


def is_split_url(source: str) -> bool:
    """Whether ``source`` is the http(s) URL of a converted split (the folder's URL: its ``manifest.json`` and shards
    are under it), rather than a shard's URL (``.tar``) or a pattern of them. One with a query or fragment (a signed
    URL) is not: the file names could not be appended to it."""
    url = urlparse(source)
    return url.scheme.lower() in ("http", "https") and not (url.query or url.fragment) \
        and not source.endswith(".tar") and "{" not in source


def split_source(data_root: str | Path, data: str) -> str | Path:
    """Where a recipe's split is: an http(s) split URL as it is, else the folder ``data_root / data``."""
    return data if is_split_url(data) else Path(data_root) / data


def require_streaming(url: str) -> None:
    """ValueError unless streaming was enabled (``UNIPERCEIVER_STREAMING=1``): a URL or pipe is opened only then. The
    switch is the user's environment, never a file's: a recipe or manifest naming a URL does not enable it."""
    if os.environ.get(STREAMING_ENV) != "1":
        raise ValueError(f"shard source {url} is a URL or pipe; set {STREAMING_ENV}=1 to stream shards from it")


def stream_timeout(seconds: float = STREAM_TIMEOUT) -> float:
    """Seconds an http(s) server may take to answer or to send the next bytes: ``seconds``, or
    ``UNIPERCEIVER_STREAM_TIMEOUT`` where it is set; ValueError unless it is positive."""
    value = os.environ.get(STREAM_TIMEOUT_ENV) or str(seconds)
    with contextlib.suppress(ValueError):
        if 0 < float(value) < math.inf:
            return float(value)
    raise ValueError(f"stream timeout ({STREAM_TIMEOUT_ENV} or stream_timeout) must be a finite number of seconds > 0, "
                     f"got {value[:80]!r}")


def fetch_manifest(url: str) -> Any:
    """A split URL's ``manifest.json``, fetched (streaming enabled) within :data:`MAX_MANIFEST` bytes and parsed; any
    failure is one line."""
    require_streaming(url)
    target = f"{url.rstrip('/')}/{MANIFEST}"
    data = _FETCHED.get(target)
    if data is None:
        try:
            with urllib.request.urlopen(target, timeout=stream_timeout()) as response:  # noqa: S310 - the user's URL
                data = response.read(MAX_MANIFEST + 1)
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors; a timeout too
            raise ValueError(f"cannot fetch {target}: {' '.join(str(e).split())[:300]}") from None
        if len(data) > MAX_MANIFEST:
            raise ValueError(f"{target} is larger than {MAX_MANIFEST >> 20} MB; not read")
        _FETCHED[target] = data  # once per process: the class names and the shards a run reads come from one copy
    return parse_json(data, target)


def shard_urls(url: str, manifest: Manifest) -> list[str]:
    """The URLs of a split URL's shards (each a ``shard-N.tar`` name checked by :meth:`Manifest.parse`, so all lie
    under ``url``)."""
    return [f"{url.rstrip('/')}/{shard.file}" for shard in manifest.shards]


def shard_path(directory: Path, name: str) -> Path:
    """The path of shard ``name`` of the split in ``directory``. ValueError where it resolves outside the folder (a
    symlink to elsewhere): a manifest reads only its own folder's files."""
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ValueError(f"{directory / MANIFEST}: shard {name!r} resolves to {path.resolve()}, outside {directory}")
    return path


def plan_shards(num_items: int, min_shards: int = 8, max_per_shard: int = 1000) -> list[range]:
    """Contiguous item ranges, one per shard: at least ``min_shards`` (so every process x worker gets
    a shard) unless there are fewer items, and at most ``max_per_shard`` items each."""
    if num_items == 0:
        return []
    count = min(num_items, max(min_shards, math.ceil(num_items / max_per_shard)))
    bounds = [round(i * num_items / count) for i in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical inputs, identical bytes
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_shard(directory: Path, index: int, items: Sequence[Any],
                 make_sample: Callable[[Any], Sample]) -> dict[str, Any]:
    """Write one shard atomically; returns its stats (also saved next to it).

    A shard whose items were all skipped keeps only its stats (its skips count, and resuming finds it done):
    no tar is written, and the manifest does not list it.
    """
    name = f"shard-{index:06d}.tar"
    skipped: Counter[str] = Counter()
    examples: list[dict[str, str]] = []
    keys: list[str] = []
    members: list[list[str]] = []  # each sample's member extensions, in the tar's order
    labels: list[int | None] = []
    tmp = directory / (name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for item in items:
            try:
                sample = make_sample(item)
            except Skip as skip:
                skipped[skip.reason] += 1
                if len(examples) < MAX_SKIP_EXAMPLES:
                    examples.append({"item": str(item)[:200], "reason": skip.reason, "detail": skip.detail[:200]})
                continue
            if "." in sample.key or "/" in sample.key:
                raise ValueError(f"sample key {sample.key!r} contains '.' or '/'")
            files = sample.members()
            for ext, data in files.items():
                _tar_member(tar, f"{sample.key}.{ext}", data)
            keys.append(sample.key)
            members.append(list(files))
            labels.append(sample.label)
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name}: sample keys repeat; each sample needs its own key")
    if keys:
        os.replace(tmp, directory / name)
    else:
        tmp.unlink()
    # The keys and labels let a loader pick subsets (e.g. class-balanced 1%) without reading any tar; the keys
    # and members tell it exactly which samples lost a member to a damaged tar header.
    stats = {"file": name, "samples": len(keys), "bytes": (directory / name).stat().st_size if keys else 0,
             "skipped": dict(skipped), "skipped_examples": examples, "keys": keys, "members": members,
             "labels": labels}
    (directory / f"shard-{index:06d}.json").write_text(json.dumps(stats) + "\n")
    return stats


def _done(directory: Path, index: int, size: int) -> dict[str, Any] | None:
    """The stats of shard ``index`` if an earlier run finished it: all ``size`` items written or skipped."""
    tar, stats = directory / f"shard-{index:06d}.tar", directory / f"shard-{index:06d}.json"
    try:
        done = json.loads(stats.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    finished = tar.exists() or done["samples"] == 0
    return done if finished and done["samples"] + sum(done["skipped"].values()) == size else None


def write_shards(directory: str | Path, items: Sequence[Any], make_sample: Callable[[Any], Sample], *,
                 manifest: Manifest, min_shards: int = 8, max_per_shard: int = 1000, workers: int = 1,
                 progress: bool = True) -> Manifest:
    """Convert ``items`` into shards in ``directory`` and write its manifest.

    Args:
        items: lightweight descriptors (paths, captions, labels) in a deterministic order.
        make_sample: reads one item into a :class:`Sample`, or raises :class:`Skip`. Must be picklable
            when ``workers`` > 1 (a module-level function or a ``functools.partial`` of one).
        manifest: the split's description; counts, shards and skips are filled in here.
        min_shards: at least this many shards (processes x data-loader workers of the training run).
        workers: processes converting shards in parallel.

    A shard whose tar and stats already exist is kept, so re-running an interrupted conversion resumes. The
    manifest lists only shards that hold samples: a shard whose items were all skipped is left out (its skips
    are counted), so a split can have fewer than ``min_shards`` shards.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(len(items), min_shards, max_per_shard)
    found = {index: _done(directory, index, len(span)) for index, span in enumerate(plan)}
    results = {index: stats for index, stats in found.items() if stats is not None}
    todo = [index for index, stats in found.items() if stats is None]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("items  {task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"{manifest.dataset}/{manifest.split}", total=len(items), rate="")
        bar.advance(task, sum(len(plan[i]) for i in results))
        write = partial(_write_shard, directory, make_sample=make_sample)
        chunks = [[items[j] for j in plan[i]] for i in todo]
        with ProcessPoolExecutor(workers) if workers > 1 and len(todo) > 1 else contextlib.nullcontext() as pool:
            for i, stats in zip(todo, (pool.map if pool else map)(write, todo, chunks), strict=True):
                results[i] = stats
                bar.advance(task, len(plan[i]))
                bar.update(task, rate=_rate(bar, task))
    shards = [results[i] for i in range(len(plan))]
    skipped: Counter[str] = Counter()
    for stats in shards:
        skipped.update(stats["skipped"])
    manifest.shards = [ShardInfo(s["file"], s["samples"], s["bytes"]) for s in shards if s["samples"]]
    manifest.skipped = dict(sorted(skipped.items()))
    manifest.skipped_examples = [e for s in shards for e in s["skipped_examples"]][:MAX_SKIP_EXAMPLES]
    manifest.num_samples = sum(s.samples for s in manifest.shards)
    manifest.save(directory)
    return manifest


def read_metas(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Each sample's meta (its ``.json`` member) by key, read from a converted split's shards (never extracted)."""
    directory = Path(directory)
    metas = {}
    for path in Manifest.load(directory).shard_paths(directory):
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")  # the loader's rule: the key ends at the first dot
                if member.isfile() and ext == "json":
                    metas[key] = json.loads(tar.extractfile(member).read())
    return metas


def _rate(bar: Progress, task_id: int) -> str:
    speed = bar.tasks[task_id].speed
    return f"{speed:,.0f}/s" if speed else ""
