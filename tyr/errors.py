"""Errors users see: each names the problem; the CLI turns them into a message and a non-zero exit."""


class TyrError(Exception):
    """Bad input or a failed check, reported to the user without a traceback."""
