"""Why a sample or an object folder is refused: SampleError and its stable reason codes.

A module of its own so that the PNG reader and the shard codec can both raise it without
importing each other.
"""
from __future__ import annotations

from nova3d.errors import Nova3DError

# Reasons a sample or an object folder is refused; stable strings, counted by reason.
MISSING_KEY, MISSING_FILE, UNDECODABLE, INVALID = "missing_key", "missing_file", "undecodable", "invalid"


class SampleError(Nova3DError):
    """A sample or object folder that cannot be used; `reason` is one of the codes above."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
