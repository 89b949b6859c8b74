"""Exceptions whose message is the one line a user sees (the CLI prints it and exits 2)."""


class MsmtuError(Exception):
    """Base class: bad input or a refused operation, explained in one line."""


class CubeValidationError(MsmtuError, ValueError):
    """An input cube breaks the data contract of docs/design.md section 4."""


class TrainingDataError(MsmtuError, ValueError):
    """Training data (Andalusia-MSMTU layout or reference cube) is missing or inconsistent."""


class MsmtuWarning(UserWarning):
    """Something a user should know that does not stop the command (the CLI prints it as
    ``msmtu-batch: warning: ...``)."""
