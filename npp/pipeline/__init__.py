"""Shared data layer: shard schema, writer, streaming reader, toy dataset, image I/O."""
