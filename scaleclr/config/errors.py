"""The one exception type for bad configuration, and key suggestions."""
import difflib
from typing import Iterable, List


class ConfigError(ValueError):
    """A configuration key or value is not allowed. The message names the key and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> List[str]:
    """Closest matches of `name` among `candidates` (case-insensitive)."""
    candidates = list(candidates)
    lower = {c.lower(): c for c in candidates}
    return [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)]
