"""Which answers are retried, and how long to wait before the next attempt."""

from __future__ import annotations

import email.utils
import math
import random
import time

# 408 and 429 are the client errors that say "later"; every 5xx may pass.
RETRIED_CLIENT_ERRORS = frozenset({408, 429})


def is_retried(status: int) -> bool:
    """Whether an HTTP status means: send the same batch again later."""
    return status in RETRIED_CLIENT_ERRORS or status >= 500


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None.

    ``now`` is the wall-clock time (``time.time()``) an HTTP date is measured from.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(
    failures: int,
    initial: float,
    maximum: float,
    retry_after: float | None,
    rng: random.Random,
) -> float:
    """Seconds to wait after the ``failures``-th failed attempt in a row (1 for the first).

    Exponential backoff with full jitter: a uniform draw below
    ``min(maximum, initial * 2**(failures - 1))``, so that many clients that
    failed together do not come back together. A ``Retry-After`` from the
    service is a floor (capped at ``maximum``, so that a wrong header cannot
    stall the client), spread by up to 10% for the same reason.
    """
    cap = min(maximum, initial * math.pow(2, min(failures - 1, 64)))
    delay = rng.uniform(0, cap)
    if retry_after is not None:
        floor = min(retry_after, maximum) * rng.uniform(1.0, 1.1)
        delay = max(delay, floor)
    return delay
