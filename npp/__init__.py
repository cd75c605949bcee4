"""npp: Next Patch Prediction training pipeline for class-conditional autoregressive image generation."""

__version__ = "0.1.0"
