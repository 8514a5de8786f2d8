"""Exceptions a user can cause. Each carries a one-line message meant to be printed as is.

The CLI turns ``ConvfactorError`` into ``error: <message>`` and exit code 2; anything else is a bug
and keeps its traceback.
"""

__all__ = [
    "ConvfactorError",
    "PolicyError",
    "RankError",
    "UnknownMethodError",
    "TraceError",
    "CheckpointError",
    "ExportError",
]


class ConvfactorError(Exception):
    """Base class of every error caused by user input (model, policy, file, option)."""


class PolicyError(ConvfactorError, ValueError):
    """The policy is malformed, names an unknown method, or matches nothing."""


class RankError(ConvfactorError, ValueError):
    """A rank (or energy) is out of range for the layer it is applied to."""


class UnknownMethodError(PolicyError, KeyError):
    """A method name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TraceError(ConvfactorError, RuntimeError):
    """torch.fx could not trace the model."""


class CheckpointError(ConvfactorError, ValueError):
    """A checkpoint could not be read or does not fit the architecture."""


class ExportError(ConvfactorError, RuntimeError):
    """ONNX export or its checks failed."""
