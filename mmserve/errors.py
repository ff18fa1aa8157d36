"""Exceptions that carry a message fit to show a user (no stack trace needed)."""


class MmserveError(Exception):
    """Base class for errors whose message is meant for the user."""


class BackboneLoadError(MmserveError):
    """The backbone could not be created or its weights could not be loaded."""


class PromptConfigError(MmserveError, ValueError):
    """A prompt configuration is inconsistent with itself or with the backbone."""


class RegistryError(MmserveError):
    """A registry directory is invalid; the message names the file and the field."""
