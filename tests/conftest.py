import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_THREADS = torch.get_num_threads()
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test runs two workers on two cores: one compute thread each
    torch.set_num_threads(1)


@pytest.fixture
def default_threads():
    """torch's own thread count for a test whose bit-exact result depends on it (a parallel reduction's order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_THREADS)
    yield
    torch.set_num_threads(threads)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("UNIPERCEIVER_REFERENCE", REPO.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "ref_io.pt").exists():
        raise FileNotFoundError(f"reference fixtures not found at {REFERENCE}; set UNIPERCEIVER_REFERENCE")
    return REFERENCE


@pytest.fixture(scope="session")
def ref_io(reference_dir: Path) -> dict:
    return torch.load(reference_dir / "ref_io.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def ref_moe_io(reference_dir: Path) -> dict:
    return torch.load(reference_dir / "ref_moe_io.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def toyworld_32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny ToyWorld at 32 px with 2-frame clips, one shard per split: the data of the one-step harness
    (benchmarks/sync_census.py) and the compile, FLOPs and host-sync tests, which only read it."""
    from uniperceiver_cli.data.toyworld import generate

    root = tmp_path_factory.mktemp("toyworld_32")
    generate(root, size="tiny", image_size=32, num_frames=2, min_shards=1, progress=False)
    return root
