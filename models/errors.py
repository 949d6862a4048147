"""Errors the model side raises for bad input; the serving side maps each to one HTTP / gRPC status.

They cross Ray process boundaries: Ray re-raises a remote exception as an instance of its original class,
so the ingress can tell a bad request from a crash without parsing messages.
"""

from __future__ import annotations


class StageInputError(ValueError):
    """A request a stage cannot run as given (the client's fault: 422)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[type[StageInputError], tuple[str, str | None]]:
        # Keep ``param`` when Ray pickles the exception back to the caller.
        return (type(self), (self.message, self.param))


class PromptTooLongError(StageInputError):
    """The prompt has more tokens than the configured maximum."""


class UnknownModelError(StageInputError):
    """The request names a model this replica does not serve (404)."""


class AdapterError(StageInputError):
    """A LoRA adapter that cannot be used (corrupt, unsafe, for another base model, unsupported layers): 422."""
