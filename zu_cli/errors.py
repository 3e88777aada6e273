"""One exception family for zu; the CLI maps each to an exit code (design §4)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_CHECKPOINT = 3
EXIT_INTEGRITY = 4
EXIT_NUMERICAL = 5
EXIT_OUTPUT = 6
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: a bug in zu, never read as a verdict
EXIT_INTERRUPTED = 130


class ZuError(Exception):
    """Base of every error zu reports to a user.

    Args:
        message: one line saying what is wrong (names the file, line and field where relevant).
        hint: one line saying what to do about it, or None.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(ZuError):
    """Invalid command-line usage or option value (exit 2)."""

    exit_code = EXIT_USAGE


class InputFileError(ZuError):
    """A request, config or corpus file is malformed (exit 2)."""

    exit_code = EXIT_USAGE


class CheckpointError(ZuError):
    """Checkpoint missing, corrupt or of an unsupported architecture (exit 3)."""

    exit_code = EXIT_CHECKPOINT


class IntegrityError(ZuError):
    """Bad signature, digest mismatch or untrusted key (exit 4)."""

    exit_code = EXIT_INTEGRITY


class NumericalError(ZuError):
    """The solve produced NaN/Inf, was ill-conditioned or changed a weight too much (exit 5)."""

    exit_code = EXIT_NUMERICAL


class OutputError(ZuError):
    """An output zu was asked to write (report, checkpoint, receipt) could not be written (exit 6).

    Its own code so that CI never reads "the JUnit file could not be written" as "a fact is
    still recalled" (exit 1).
    """

    exit_code = EXIT_OUTPUT


class VerificationFailed(ZuError):
    """A probe failed: a forgotten fact is still recalled or a kept fact was lost (exit 1)."""

    exit_code = EXIT_VERIFY_FAILED
