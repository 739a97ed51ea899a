"""One digest for "the same inputs": resumable work is reused only when the fingerprint of its inputs matches."""

from __future__ import annotations

import hashlib
import json


def fingerprint(data, length: int | None = None) -> str:
    """SHA-256 of ``data`` as canonical JSON (sorted keys; anything JSON lacks as its str), hex, cut to ``length``."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
