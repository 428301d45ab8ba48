"""Untrusted shard sources: a shard list or folder runs nothing and opens no URL unless streaming was asked for, a
manifest reads only its own folder, and a broken or stalled stream is a counted skip."""

from __future__ import annotations

import http.server
import json
import shlex
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from uniperceiver_cli.data.corpus import corpus_tokens
from uniperceiver_cli.data.loader import UNREADABLE_SHARD, ShardLoader, make_loader
from uniperceiver_cli.data.shards import (
    STREAM_TIMEOUT_ENV,
    STREAMING_ENV,
    Manifest,
    Sample,
    is_remote,
    read_metas,
    write_shards,
)

PER_SHARD = 3


def _texts(directory: Path, texts: list[str], shards: int) -> Path:
    """A converted text split: ``texts`` as samples ``s000``, ``s001``, ... in ``shards`` shards."""
    manifest = Manifest(dataset="t", split="train", modality="text", tasks=["text_mlm"], source="t")
    samples = [Sample(f"s{i:03d}", text=text, meta={"captions": [text]}) for i, text in enumerate(texts)]
    write_shards(directory, samples, lambda sample: sample, manifest=manifest, min_shards=shards, progress=False)
    return directory


def _passages(shards: int) -> list[str]:
    return [f"passage number {i}" for i in range(shards * PER_SHARD)]


def _keys(shards: int) -> list[str]:
    return [f"s{i:03d}" for i in range(shards * PER_SHARD)]


def _loader(source: str | Path | list[str], **kwargs) -> ShardLoader:
    return make_loader(source, task="text_mlm", train=False, batch_size=64, image_size=32, **kwargs)


def _read(source: str | Path | list[str], **kwargs) -> tuple[list[str], dict[str, int]]:
    loader = _loader(source, **kwargs)
    keys = [key for batch in loader for key in batch["keys"]]
    return keys, dict(loader.skipped)


@pytest.fixture(autouse=True)
def _no_streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STREAMING_ENV, raising=False)
    monkeypatch.delenv(STREAM_TIMEOUT_ENV, raising=False)


# ---------------------------------------------------------------------------------------------------- pipes and URLs


@pytest.mark.parametrize(("source", "remote"), [
    ("pipe:cat x.tar", True), ("http://host/shard-000000.tar", True), ("https://host/a.tar", True),
    ("gs://bucket/a.tar", True), ("s3://bucket/a.tar", True), ("HTTP://host/a.tar", True),
    ("data/shard-000000.tar", False), ("/data/pipe:x/shard.tar", False), ("./pipe:x/shard.tar", False),
    ("shard-{000000..000003}.tar", False), ("C:\\data\\shard.tar", False),
])
def test_is_remote_tells_urls_and_pipes_from_local_paths(source: str, remote: bool) -> None:
    assert is_remote(source) is remote


def test_a_folder_named_like_a_pipe_is_read_as_files_and_runs_nothing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = Path("pipe:touch MARKER #")  # its shards' paths, "pipe:touch MARKER #/shard-...", would run `touch MARKER`
    _texts(folder, _passages(2), shards=2)
    read = _read(str(folder))
    corpus_tokens(folder, Manifest.load(folder))
    assert not (tmp_path / "MARKER").exists()
    assert read == (_keys(2), {})


@pytest.mark.parametrize("kind", ["list", "pattern", "url"])
def test_a_pipe_or_url_is_refused_unless_streaming_is_enabled(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "MARKER"
    source = {"list": [f"pipe:touch {marker}"], "pattern": f"pipe:touch {marker}-{{1..2}}",
              "url": "http://127.0.0.1:9/shard-{000000..000001}.tar"}[kind]
    with pytest.raises(ValueError, match=f"set {STREAMING_ENV}=1") as error:
        _loader(source)
    assert ("pipe:touch" if kind != "url" else "http://127.0.0.1:9/shard-000000.tar") in str(error.value)
    assert "\n" not in str(error.value)
    assert not list(tmp_path.glob("MARKER*"))


def test_a_pipe_streams_when_enabled_and_a_failing_one_is_counted(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    split = _texts(tmp_path / "split", _passages(1), shards=1)
    monkeypatch.setenv(STREAMING_ENV, "1")
    good = f"pipe:cat {shlex.quote(str(split / 'shard-000000.tar'))}"
    failing = f"pipe:cat {shlex.quote(str(tmp_path / 'missing.tar'))}"  # cat exits 1: the pipe's close() raises
    assert _read([good]) == (_keys(1), {})
    assert _read([failing, good]) == (_keys(1), {UNREADABLE_SHARD: 1})


# ---------------------------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("entry", ["absolute", "parent", "nested", "symlink"])
def test_a_manifest_reads_only_its_own_folder(tmp_path: Path, entry: str) -> None:
    secret = _texts(tmp_path / "outside", ["zebra"], shards=1) / "shard-000000.tar"
    split = _texts(tmp_path / "split", _passages(1), shards=1)
    name = {"absolute": str(secret), "parent": "../outside/shard-000000.tar", "nested": "sub/shard-000000.tar",
            "symlink": "shard-000001.tar"}[entry]
    if entry == "symlink":
        (split / name).symlink_to(secret)
    if entry == "nested":
        (split / "sub").mkdir()
        shutil.copy(secret, split / name)
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"].append({"file": name, "samples": 1, "bytes": secret.stat().st_size})
    (split / "manifest.json").write_text(json.dumps(manifest))

    reads = {"loader": lambda: _read(split), "metas": lambda: read_metas(split),
             "corpus": lambda: corpus_tokens(split, Manifest.load(split))}
    for what, read in reads.items():
        with pytest.raises(ValueError, match="manifest.json") as error:  # before a byte of the shard is read
            read()
        assert repr(name) in str(error.value) and "\n" not in str(error.value), what


def test_a_stats_file_that_links_out_of_its_folder_is_not_read(tmp_path: Path) -> None:
    split = _texts(tmp_path / "split", _passages(2), shards=1)
    stats = split / "shard-000000.json"
    outside = tmp_path / "outside.json"
    outside.write_text(stats.read_text())
    stats.unlink()
    stats.symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):  # the subset draws from the stats files
        _loader(split, subset=0.5)
    assert _read(split) == (_keys(2), {})  # read without the listing, by the cautious rule


# ---------------------------------------------------------------------------------------------------- streaming

# What the test server does with each shard: serve it, drop the connection halfway, 404, or stall halfway or before
# answering (until the test ends).
SERVED = ["serve", "drop", "missing", "stall", "stall before headers", "serve"]


class _Shards(http.server.BaseHTTPRequestHandler):
    folder: Path
    release: threading.Event

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        name = self.path.lstrip("/")
        what = SERVED[int(name.removeprefix("shard-").removesuffix(".tar"))]
        if what == "missing":
            self.send_error(404)
            return
        if what == "stall before headers":
            self.release.wait(10)
            return
        body = (self.folder / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if what == "serve" else body[: len(body) // 2])
        self.wfile.flush()
        if what == "stall":
            self.release.wait(10)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A base URL on 127.0.0.1 serving a split's shards as :data:`SERVED` says."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    handler = type("Handler", (_Shards,), {"folder": _texts(tmp_path / "split", _passages(len(SERVED)), len(SERVED)),
                                           "release": threading.Event()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    handler.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("setting", ["argument", "environment"])
def test_broken_and_stalled_streams_are_counted_and_the_good_shards_read(
        server: str, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv(STREAMING_ENV, "1")
    if setting == "environment":
        monkeypatch.setenv(STREAM_TIMEOUT_ENV, "0.5")
    keys, skipped = _read(f"{server}/shard-{{000000..{len(SERVED) - 1:06d}}}.tar",
                          **({"stream_timeout": 0.5} if setting == "argument" else {}))
    good = [key for i, key in enumerate(_keys(len(SERVED))) if SERVED[i // PER_SHARD] == "serve"]
    dropped = [key for i, key in enumerate(_keys(len(SERVED))) if SERVED[i // PER_SHARD] == "drop"]
    assert skipped == {UNREADABLE_SHARD: len(SERVED) - 2}
    assert [key for key in keys if key not in dropped] == good  # and the samples wholly before the drop, if any


def test_a_bad_stream_timeout_is_one_line_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STREAM_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=f"{STREAM_TIMEOUT_ENV} or stream_timeout.*'soon'"):
        _loader("unused-{000000..000001}.tar")


def test_a_manifest_nested_too_deeply_or_named_otherwise_is_one_line(tmp_path: Path) -> None:
    split = _texts(tmp_path / "split", _passages(1), shards=1)
    (split / "manifest.json").write_text("[" * 200_000)
    with pytest.raises(ValueError, match="is not valid JSON \\(nested too deeply\\)"):
        _loader(split)
    other = tmp_path / "m{0..999999999}"  # a file holding a manifest is not a split folder, nor a pattern
    other.write_text((tmp_path / "split" / "shard-000000.json").read_text())
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        Manifest.load(other)
    with pytest.raises(FileNotFoundError, match="is not a shard folder"):
        _loader(other)
