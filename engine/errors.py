"""Exceptions whose message is meant for the user: the CLI prints them as one line."""

from __future__ import annotations


class PdserveError(Exception):
    """Base of errors caused by user input (config, model folder, request parameters)."""


class ConfigError(PdserveError, ValueError):
    """A config file or value is invalid; the message names the key."""


class DeployError(PdserveError, RuntimeError):
    """The cluster could not place or start what the config asks for; the message says why."""
