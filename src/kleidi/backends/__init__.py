"""Backends hold the KEK. Each module defines one class implementing :class:`kleidi.backends.base.Backend`."""
