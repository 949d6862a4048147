"""Registry failures: every one names the reference and says what to do."""

from __future__ import annotations


class RegistryError(RuntimeError):
    """A reference cannot be resolved, fetched or verified; nothing from it is served."""

    def __init__(self, message: str, ref: str | None = None) -> None:
        super().__init__(f"{ref}: {message}" if ref else message)
        self.message = message
        self.ref = ref

    def __reduce__(self) -> tuple[type[RegistryError], tuple[str, str | None]]:
        return (type(self), (self.message, self.ref))


class IntegrityError(RegistryError):
    """A fetched file does not match the manifest (size or sha256)."""


class UnsafeWeightsError(RegistryError):
    """The model holds pickle-based weights and the unsafe option is off."""


class NotFoundError(RegistryError):
    """The reference, its revision or its manifest does not exist in the store."""
