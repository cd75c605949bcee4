"""Stage 2: DeepSpeed training with the NPP patch schedule."""
