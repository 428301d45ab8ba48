"""Models by name: the reference's released checkpoints (a file the user downloaded, found in the models folder and
checked against its hash when one is known) and ``hf-hub:ORG/NAME`` bundles through the Hugging Face cache.

Nothing is downloaded here except an ``hf-hub:`` bundle when the hub is online (``HF_HUB_OFFLINE=1`` keeps it to the
cache), and then only its ``config.json`` and ``model.safetensors``: a hub repository is a handed folder, and those
two files are the bundle format that holds no code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from uniperceiver_cli.checkpoints.errors import CheckpointError

MODELS_ENV = "UNIPERCEIVER_MODELS"
HUB_PREFIX = "hf-hub:"
CHECKSUMS_NOTE = "the reference publishes no checksums"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class Pretrained:
    """A released checkpoint of the reference (its ``data/checkpoints.md``).

    Attributes:
        name: what ``load_model`` and ``--model`` take.
        preset: the model preset its shapes are.
        parameters: the parameter count the reference gives (for image-text tasks).
        files: the file names it is found under in the models folder, the reference's download first; ``NAME.pth``
            is always accepted too (the reference names no file for the MoE models).
        formats: "torch" (a ``{'model': ...}`` file) and/or "ds" (a DeepSpeed ``mp_rank_00_model_states.pt``).
        url: where the reference offers it (Google Drive; downloaded by the user).
        sha256: the file's hash where known; a file found under the name must match it.
    """

    name: str
    preset: str
    parameters: str
    files: tuple[str, ...]
    formats: str
    url: str
    sha256: str | None = None

    def candidates(self) -> tuple[str, ...]:
        return (*self.files, f"{self.name}.pth")


_DRIVE = "https://drive.google.com/file/d/{}/view"
PRETRAINED: tuple[Pretrained, ...] = (
    Pretrained("uni-perceiver-base", "base", "124M",
               ("uni-perceiver-base-L12-H768-224size-torch-pretrained.pth",
                "uni-perceiver-base-L12-H768-224size-pretrained.pth"),
               "torch, ds", _DRIVE.format("1NjMrKWHGEigFO0SsLKPqCw1oz6IkKT7W")),
    Pretrained("uni-perceiver-moe-base", "base-moe", "167M", (), "ds",
               _DRIVE.format("1w_CPXJGvE1XXpOpVDnxLBDFglrh-18S-")),
    Pretrained("uni-perceiver-large", "large", "354M", ("uni-perceiver-large-L24-H1024-224size-pretrained.pth",),
               "ds", _DRIVE.format("1G55-YmFIDCXJw3s98MtFB7yGtFjGIcXQ")),
    Pretrained("uni-perceiver-moe-large", "large-moe", "505M", (), "ds",
               _DRIVE.format("1sj03SIKeVZpeGGFt-7srapO_abhu3ccz")),
)


def list_pretrained() -> list[str]:
    """The names of the released checkpoints, as ``load_model`` takes them."""
    return [entry.name for entry in PRETRAINED]


def models_dirs() -> list[Path]:
    """Where a released checkpoint is looked for: ``$UNIPERCEIVER_MODELS`` (else ``~/.cache/uniperceiver/models``),
    then ``checkpoints/`` of the current directory (where docs/reproduce.md puts them)."""
    home = os.environ.get(MODELS_ENV) or str(Path.home() / ".cache" / "uniperceiver" / "models")
    return [Path(home), Path("checkpoints")]


def find_pretrained(entry: Pretrained) -> Path | None:
    """The downloaded file of a released checkpoint, or None."""
    for folder in models_dirs():
        for name in entry.candidates():
            if (folder / name).is_file():
                return folder / name
    return None


def pretrained_entry(name: str) -> Pretrained | None:
    return next((entry for entry in PRETRAINED if entry.name == name), None)


def resolve_model(src: str | Path) -> Path:
    """A model given by path, released name or ``hf-hub:ORG/NAME[@REVISION]``, as the local path to load. A path
    that exists is taken as it is (a folder named like a released model included)."""
    text = str(src)
    if text.startswith(HUB_PREFIX):
        return _from_hub(text[len(HUB_PREFIX):])
    path = Path(src)
    entry = pretrained_entry(text)
    if entry is None or path.exists():
        return path
    found = find_pretrained(entry)
    if found is None:
        folders = " or ".join(str(folder) for folder in models_dirs())
        raise CheckpointError(f"{entry.name} is not downloaded: download it from {entry.url} and save it in {folders} "
                              f"as {entry.candidates()[0]} (set {MODELS_ENV} for another folder)")
    if entry.sha256 is not None:
        from uniperceiver_cli.checkpoints.sources import sha256_of  # here: it imports torch, which listing never needs

        digest = sha256_of(found)
        if digest != entry.sha256:
            raise CheckpointError(f"{found} is not the released {entry.name}: its sha256 is {digest[:16]}..., "
                                  f"expected {entry.sha256[:16]}... (a partial or corrupted download); download it "
                                  f"again")
    return found


def _from_hub(spec: str) -> Path:
    """The local snapshot folder of a bundle on the Hugging Face Hub (from the cache when ``HF_HUB_OFFLINE=1``)."""
    repo, _, revision = spec.partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise CheckpointError(f"{HUB_PREFIX}{spec}: give {HUB_PREFIX}ORG/NAME (optionally @REVISION)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # timm depends on it, so it is there unless removed
        raise CheckpointError(f"{HUB_PREFIX} models need huggingface_hub ({e})") from None
    try:
        folder = snapshot_download(repo, revision=revision or None, allow_patterns=["config.json", "model.safetensors"])
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{HUB_PREFIX}{spec} is not in the Hugging Face cache and the hub cannot be reached "
                              f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}); download it where there is "
                              f"a network, or copy the cache (HF_HUB_CACHE)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{HUB_PREFIX}{spec}: {' '.join(str(e).split())[:300]}") from None
    path = Path(folder)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{HUB_PREFIX}{spec} holds no model bundle (config.json and model.safetensors, as "
                              f"uniperceiver export writes them)")
    return path
