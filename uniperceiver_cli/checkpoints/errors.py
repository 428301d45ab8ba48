"""What loading a checkpoint raises or warns."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but is suspect (non-finite weights), or what an interrupted export left beside a
    bundle and was put right; the message is one line."""
