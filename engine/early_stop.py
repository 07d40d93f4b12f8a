"""Keep a SIGTERM that comes while ``guichet serve`` starts, until its own handling is set.

As PID 1 of a container without an init, the kernel drops a signal the process has not
set a handler for (all but SIGKILL and SIGSTOP, which come from outside). A stop sent while
the engine imported its modules (0.4 s measured under load, more on a slow machine) was
lost: the engine went on to serve until it was killed at the end of the stop's grace
period, requests in flight and all. ``keep`` is called before the engine's modules are
imported; the supervisor and a lone worker then act on what ``received`` says once their
own handlers are set. A SIGTERM in the tens of milliseconds before ``keep``
(Python itself starting) is still lost: hence ``--init`` (deploy/README.md).

SIGINT needs none of this: Python handles it from the start (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_received: int | None = None


def _record(signum: int, _frame: FrameType | None) -> None:
    global _received
    _received = signum


def keep() -> None:
    """From now on, a SIGTERM is recorded until a handler of the engine's takes over."""
    signal.signal(signal.SIGTERM, _record)


def received() -> int | None:
    """The signal recorded since ``keep``, if any (then said on stderr)."""
    if _received is not None:
        print("guichet: stopped while starting", file=sys.stderr, flush=True)
    return _received
