"""User-facing errors.

Anything a user can cause (a missing file, a bad setting, malformed data) raises
:class:`LmforgeError` with one clear sentence. The CLI prints it as ``error: ...``
and exits with status 2, without a traceback. Bugs stay ordinary exceptions.
"""


class LmforgeError(Exception):
    """An error caused by user input: reported without a traceback."""


class ConfigError(LmforgeError):
    """A recipe or override is invalid."""


class DataError(LmforgeError):
    """Input data is missing, empty or malformed."""
