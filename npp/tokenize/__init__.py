"""Stage 1: images → VQ codes → WebDataset shards."""
