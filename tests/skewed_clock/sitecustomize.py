"""A host clock that is off, for the service under test: Python imports this module at
start when its directory is on ``PYTHONPATH``.

``TEST_CLOCK_OFFSET_SECONDS`` moves ``time.time()`` and ``time.time_ns()`` (the wall
clock the service stamps records with and measures against the database's) by that
many seconds; the monotonic clocks, sleeps and timeouts are untouched, as on a host
whose wall clock was set wrong. Nothing of this is in the service's own code.

(libfaketime would be the system-level way, but the version in Debian 12 breaks
``time.sleep`` of Python 3.11+ when the monotonic clock is left alone, and hangs
thread waits when it is not: wolfcw/libfaketime#426.)
"""

import os
import time

_OFFSET = float(os.environ.get("TEST_CLOCK_OFFSET_SECONDS", "0") or 0)

if _OFFSET:
    _real_time, _real_time_ns = time.time, time.time_ns
    _offset_ns = round(_OFFSET * 1_000_000_000)

    def _time() -> float:
        return _real_time() + _OFFSET

    def _time_ns() -> int:
        return _real_time_ns() + _offset_ns

    time.time = _time
    time.time_ns = _time_ns
