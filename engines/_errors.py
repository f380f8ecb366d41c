"""Exit codes of the CI gate and errors specific to engines."""

from mixrank.core import MixrankError

EXIT_OK = 0
EXIT_LIMIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_NOT_MEASURED = 3


class NotInstalledError(MixrankError):
    """An engine whose package is not installed (the message names the package)."""


__all__ = ["EXIT_LIMIT_FAILED", "EXIT_NOT_MEASURED", "EXIT_OK", "EXIT_USER_ERROR",
           "MixrankError", "NotInstalledError"]
