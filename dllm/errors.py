"""One exception family for the whole toolkit.

Every error says what arrived, what was expected and how to fix it, so a
user never has to read a traceback to know what to do next.
"""


class DllmError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class CheckpointError(DllmError):
    """A checkpoint directory is missing files, tensors or config keys."""


class ConfigError(DllmError, ValueError):
    """A config value is out of range or inconsistent with another."""


class ExportError(DllmError):
    """Exporting a subgraph to ONNX failed."""


class ValidationError(DllmError):
    """An exported subgraph disagrees with its PyTorch module."""


class EngineDirError(DllmError):
    """An engine directory is incomplete, stale or from another schema."""


class BackendError(DllmError):
    """A backend is not installed, or a feed does not match a declaration."""


class IntegrityError(EngineDirError):
    """A file of an engine directory differs from what its manifest recorded (size or sha256)."""


class DllmWarning(UserWarning):
    """Something was accepted but changed on the way (e.g. characters the tokenizer does not know)."""
