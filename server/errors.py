"""The daemon's exceptions: one root, so the CLI can turn any expected failure into a clean message."""

from __future__ import annotations


class SpeakdError(Exception):
    """Root of every failure the daemon reports to a person instead of as a traceback."""


class ConfigError(SpeakdError):
    """A configuration file or option is wrong; the message names the key and why."""


class DependencyError(SpeakdError):
    """A required library or system package is missing; the message says what to install."""


class ModelError(SpeakdError):
    """Model assets are missing, corrupt or fail to load."""


class SynthesisError(SpeakdError):
    """One item failed in a pipeline stage; only its context is affected, the daemon keeps serving."""
