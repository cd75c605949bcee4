"""The train stage's error type (its own module so every train component can raise it)."""

from npp.errors import NppError


class TrainingError(NppError, RuntimeError):
    """A run that cannot start or go on as asked; the message says what to do."""
