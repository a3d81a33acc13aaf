"""argparse ``type`` helpers the components' command lines share."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

#: The longest interval a flag takes: a day. (A wait much longer than that overflows a thread's
#: timeout: ``--health-interval inf`` killed the health thread, and a failing device stayed Healthy.)
MAX_INTERVAL_S = 86400.0


def seconds(*, zero_ok: bool = False, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number of seconds, > 0 (>= 0 with ``zero_ok``) and at most
    ``maximum``: nan (which compares false, so nothing was ever reconciled or released), inf and
    negatives (a busy loop) are refused with exit status 2."""
    bounds = (">= 0" if zero_ok else "> 0") + (f" and <= {maximum:g}" if maximum is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if (
            not math.isfinite(value)
            or value < 0
            or (value == 0 and not zero_ok)
            or (maximum is not None and value > maximum)
        ):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds {bounds}")
        return value

    return parse
