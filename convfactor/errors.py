"""Exceptions a user can cause. Each carries a one-line message meant to be printed as is.

The CLI turns ``ConvfactorError`` into ``error: <message>`` and exit code 2; anything else is a bug
and keeps its traceback. ``ConvfactorError`` derives from the passes' ``PassInputError``, so the pass
runner lets a user mistake found inside a pass through unchanged; ``one_line`` formats a message.
"""

from passes.errors import CaptureError, PassInputError, one_line

__all__ = [
    "one_line",
    "ConvfactorError",
    "PolicyError",
    "RankError",
    "UnknownMethodError",
    "TraceError",
    "CheckpointError",
    "ExportError",
    "InputSpecError",
    "NothingReplacedError",
]


class ConvfactorError(PassInputError):
    """Base class of every error caused by user input (model, policy, file, option)."""


class PolicyError(ConvfactorError, ValueError):
    """The policy is malformed, names an unknown method, or matches nothing."""


class RankError(ConvfactorError, ValueError):
    """A rank (or energy) is out of range for the layer it is applied to."""


class UnknownMethodError(PolicyError, KeyError):
    """A method name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TraceError(ConvfactorError, CaptureError):
    """torch.fx could not trace the model (a ``RuntimeError``, like the passes' ``CaptureError``)."""


class CheckpointError(ConvfactorError, ValueError):
    """A checkpoint could not be read or does not fit the architecture."""


class ExportError(ConvfactorError, RuntimeError):
    """ONNX export or its checks failed."""


class InputSpecError(ConvfactorError, ValueError):
    """Example inputs, an input shape or an ONNX path given by the user cannot be used."""


class NothingReplacedError(ConvfactorError):
    """The policy left every layer as it was (each row of the report says why): an unchanged copy is not a result.

    The CLI exits with its own status for it (3), so that scripts tell it from bad input (2).
    """

    exit_code = 3
