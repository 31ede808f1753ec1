"""Exceptions a user of scalable_rec can run into.

Every error names what was expected and what came. Library code raises these (``raise ...
from err`` keeps the cause visible); ``assert`` is kept for internal invariants only.
"""


class ScalableRecError(Exception):
    """Base class of every error scalable_rec raises on purpose."""


class ConfigError(ScalableRecError, ValueError):
    """Options that are invalid or conflict with each other (all problems in one message)."""

    @classmethod
    def of(cls, problems: list[str]) -> "ConfigError":
        """One error, on one line, naming every problem (``; `` between them)."""
        return cls("Invalid options: " + "; ".join(problems))


class MalformedInputError(ScalableRecError):
    """Input rows or documents that cannot be used (raised in strict mode, else counted)."""


class ShardError(ScalableRecError):
    """A shard directory that is missing, half-written, corrupted or disagrees with its manifest."""


class CheckpointError(ScalableRecError):
    """A checkpoint that is missing, corrupted or does not match the requested config."""


class CollectiveError(ScalableRecError):
    """A torchrun collective timed out or lost its peer: another rank hung or died."""


class DownloadError(ScalableRecError):
    """A data set download that failed or whose checksum did not match."""


class DatabaseError(ScalableRecError):
    """Base class for ArangoDB problems."""


class DatabaseUnreachableError(DatabaseError):
    """The server did not answer (DNS, refused connection, TLS, timeout)."""


class AuthenticationError(DatabaseError):
    """The server rejected the credentials (HTTP 401)."""


class DatabaseNotFoundError(DatabaseError):
    """The named database does not exist (errorNum 1228)."""


class CollectionNotFoundError(DatabaseError):
    """The named collection does not exist (errorNum 1203)."""


class WriteMismatchError(DatabaseError):
    """The server's created/updated/error counts disagree with what was sent."""


class PermissionDeniedError(DatabaseError):
    """The user may not do this (HTTP 403, e.g. a read-only user writing)."""


class ExportVerificationError(DatabaseError):
    """An export's rows disagree with the server: a count differs or a key repeats."""


class RunStateError(ScalableRecError):
    """A run directory that belongs to another config, was interrupted, or no longer matches
    its shards (``--resume``, ``--overwrite`` or ``--allow-interrupted`` say what to do)."""


class LockedError(ScalableRecError):
    """Another process holds the lock of a shard or run directory (the message names it)."""


class DivergedError(ScalableRecError):
    """Training produced a non-finite loss or validation metric (learning rate too high,
    corrupted features)."""


class InterruptedRunError(ScalableRecError):
    """Training stopped on SIGTERM/SIGINT; ``last.pt`` allows ``--resume``. The CLI exits
    with the shell's convention ``128 + signal`` (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
