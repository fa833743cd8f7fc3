"""Exceptions raised by beacon.

Every error of the engine is a :class:`BeaconError`; the ones that have a built-in counterpart are
also that built-in, so ``except FileNotFoundError`` and ``except ValueError`` work as expected.
Messages are those the ``beacon`` command prints after ``error:``.
"""


class BeaconError(Exception):
    """Base class of every error raised by beacon."""


class BeaconFileNotFoundError(BeaconError, FileNotFoundError):
    """A model, weights, data or context file that does not exist."""


class BeaconOSError(BeaconError, OSError):
    """Another I/O failure (permissions, disk full, ...)."""


class BeaconValueError(BeaconError, ValueError):
    """Bad input: an argument out of range, a setting that does not apply, a file that does not parse."""


__all__ = ["BeaconError", "BeaconFileNotFoundError", "BeaconOSError", "BeaconValueError"]
