"""Exponential backoff, one formula for every retry of the operator's."""

from __future__ import annotations

#: Doublings past this change nothing (2**60 seconds outlasts any cap) and keep the power a float can
#: hold: ``2 ** attempts`` for the 1,025th failure does not convert to a float (OverflowError), which a
#: model failing every 5 minutes reaches after 3.5 days.
_MAX_DOUBLINGS = 60


def backoff_seconds(attempts: int, first: float, most: float) -> float:
    """The wait after the ``attempts``-th failure in a row: ``first`` seconds, doubling, at most ``most``."""
    return min(most, first * 2.0 ** min(max(attempts - 1, 0), _MAX_DOUBLINGS))
