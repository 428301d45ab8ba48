"""The token ids of a split's texts (captions or passages): the "corpus" target sets of captioning and MLM."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import torch

from uniperceiver_cli.data.loader import Shard, read_shards, sample_json, sample_text
from uniperceiver_cli.data.shards import Manifest, Skip, is_split_url, shard_path, stream_timeout
from uniperceiver_cli.model.config import EOT_ID
from uniperceiver_cli.model.tokenizer import get_tokenizer

TEXT_MEMBERS = frozenset({"txt", "json"})  # the members a corpus reads; the images and videos are passed over


def corpus_tokens(source: str | Path, manifest: Manifest) -> torch.Tensor:
    """Every token id in a split's texts (captions or passages), plus end-of-text: a restricted target set.

    Reads the ``txt``/``json`` members of the split's shards (local, or streamed from a split URL) with the loader's
    tar reader, so it reads past damage and leaves out the same samples as training does; the other members of a
    local shard are seeked past, not read. The result is kept for the process, keyed by the folder and its
    manifest's modification time (a URL: by the URL): training and every evaluation of a run scan a split once."""
    names = tuple(shard.file for shard in manifest.shards)
    if isinstance(source, str) and is_split_url(source):
        return _remote_tokens(source, names).clone()
    directory = Path(source)
    stamp = (directory / "manifest.json").stat().st_mtime_ns
    return _local_tokens(directory.resolve(), stamp, names).clone()


@functools.cache
def _local_tokens(directory: Path, stamp: int, shards: tuple[str, ...]) -> torch.Tensor:
    # each checked to lie in the folder
    return _tokens([Shard(str(shard_path(directory, shard))) for shard in shards])


@functools.cache
def _remote_tokens(url: str, shards: tuple[str, ...]) -> torch.Tensor:
    return _tokens([Shard(f"{url.rstrip('/')}/{shard}", remote=True) for shard in shards])


def _tokens(shards: list[Shard]) -> torch.Tensor:
    texts: set[str] = set()  # captions repeat (ToyWorld: 144k captions, 27k distinct): tokenize each once
    # Damage is counted by the loaders that read these shards for training and evaluation, not here.
    for sample in read_shards(shards, Counter(), TEXT_MEMBERS, timeout=stream_timeout()):
        try:  # no txt: "", whose one token is end-of-text
            texts.update([sample_text(sample)], sample_json(sample).get("captions", []))
        except Skip:  # text or json that does not decode: the loaders skip the sample too
            continue
    ids: set[int] = {EOT_ID}
    tokenizer = get_tokenizer()
    distinct = sorted(texts)
    for start in range(0, len(distinct), 4096):
        batch, padding = tokenizer.encode_batch(distinct[start:start + 4096])
        ids.update(batch[~padding].unique().tolist())
    return torch.tensor(sorted(ids))


def vocabulary_of(folders: list[Path]) -> torch.Tensor:
    """The token ids of several splits' texts (see :func:`corpus_tokens`), sorted and unique."""
    return torch.cat([corpus_tokens(folder, Manifest.load(folder)) for folder in folders]).unique()
