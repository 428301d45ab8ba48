"""Converters from the layouts users have on disk to shards: one module per source format."""
