"""Checkpoints: every kind the toolkit reads, and our bundle. The run directory's layout is :mod:`.runs`; every
``torch.load`` goes through :mod:`.safe_load` (``weights_only=True``). The public names are re-exported here;
the package's own modules import each from the module that defines it."""

from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.checkpoints.errors import CheckpointError, CheckpointWarning
from uniperceiver_cli.checkpoints.loading import LoadReport, load_checkpoint, load_model
from uniperceiver_cli.checkpoints.official import convert_official, infer_config
from uniperceiver_cli.checkpoints.sources import Source, find_source, read_official

__all__ = [
    "CheckpointError", "CheckpointWarning", "LoadReport", "Source", "convert_official", "find_source", "infer_config",
    "load_checkpoint", "load_model", "read_official", "save_bundle",
]
