"""The training loop's engines: plain PyTorch on one process (:mod:`.single`) and DeepSpeed (:mod:`.deepspeed`),
behind one :class:`~uniperceiver_cli.train.engines.protocol.Engine` protocol."""
