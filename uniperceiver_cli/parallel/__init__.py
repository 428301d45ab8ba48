"""Processes and their collectives: where a process runs and how it is launched (:mod:`.context`), and expert
parallelism (:mod:`.experts`). The model reaches collectives only through the expert group protocol."""
