"""The one error type users see: every message says what was wrong and what to do."""


class TokenmemError(Exception):
    """Raised for bad input or unsupported setups; the message names the problem and the fix."""


class BudgetError(TokenmemError, ValueError):
    """A budget that is not a positive int or a float in (0, 1], or too small for the protected tokens."""


class UnknownEvictorError(TokenmemError, KeyError):
    """An evictor name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(TokenmemError, TypeError):
    """A model whose attention cannot be switched to the `tokenmem` attention function."""


class MemoryStateError(TokenmemError, RuntimeError):
    """A TokenMemory used in a way that does not match what it holds (e.g. another batch)."""


class InputError(TokenmemError, ValueError):
    """Input a memory or adapter cannot use: NaN or inf keys/values, a call or prompt without tokens, a video
    without frames. Raised before anything is stored, so the memory stays as it was."""


class CorruptFileError(TokenmemError):
    """A file tokenmem reads back (a training checkpoint, a NAMM scorer, model weights) that is truncated, fails
    its checksum or cannot be parsed; ``path`` is the file."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)
