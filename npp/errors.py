"""The project's own error types.

Every error a user can cause (bad flags, a wrong file, an unusable shard set) is an
`NppError`; `npp` prints its message as one line and exits 2. Anything else is a
bug and keeps its traceback. The subclasses stay `ValueError`s where they were, so
callers that caught ValueError keep working.
"""


class NppError(Exception):
    """A problem with the user's input; the message names the file or flag and the fix."""


class UsageError(NppError, ValueError):
    """A flag value that cannot work (checked before any heavy import or work)."""


class ConfigError(NppError, ValueError):
    """A setting (schedule, model size, config field, data) that cannot be used as given."""
