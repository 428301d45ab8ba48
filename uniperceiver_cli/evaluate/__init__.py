"""Evaluation: metrics of the papers, runners over shards, decoding and result files."""
