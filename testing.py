"""The one test seam: hooks that let tests interrupt or shrink a real run, set through ``UNIRET_TEST_*``.

Product code calls these functions at the few points a test needs to reach; nothing else in uniret
reads test-only environment variables. Unset (as for every user), each hook is a no-op or returns
the product default. The variables are read at call time, so a test can set them for one
subprocess or with ``monkeypatch.setenv``.

==================================  ==========================================================
``UNIRET_TEST_SLEEP_PACK``          seconds to sleep after each commit of ``uniret data pack``
``UNIRET_TEST_PACK_COMMIT_EVERY``   images per pack commit (default 256)
``UNIRET_TEST_SLEEP_INDEX``         seconds to sleep before an index version is published
``UNIRET_TEST_SLEEP_EMBED``         seconds to sleep after each checkpoint of ``uniret embed``
``UNIRET_TEST_SLEEP_SHARD``         seconds to sleep after each IVF shard of an on-disk build
``UNIRET_TEST_SLEEP_RAY_BATCH``     seconds each Ray embedding actor sleeps after a batch (read by the
                                    driver, handed to the actors: a window to kill one)
``UNIRET_TEST_SLEEP_RAY_SHARD``     seconds each Ray task of the on-disk encode sleeps before its shard
                                    (read by the driver, handed to the tasks)
``UNIRET_TEST_INTERRUPT_TRAIN``     a step number: ``uniret train`` raises KeyboardInterrupt
                                    (a simulated Ctrl-C) before it starts that step
==================================  ==========================================================
"""

from __future__ import annotations

import os
import time

PREFIX = "UNIRET_TEST_"


def sleep_point(name: str) -> None:
    """Sleep ``UNIRET_TEST_SLEEP_<NAME>`` seconds when set: a window for a test to kill the run here."""
    seconds = float(os.environ.get(f"{PREFIX}SLEEP_{name.upper()}", "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def seconds(name: str) -> float:
    """``UNIRET_TEST_SLEEP_<NAME>`` as seconds (0 when unset), for hooks that run in other processes
    (Ray workers): read here, then handed to them."""
    return float(os.environ.get(f"{PREFIX}SLEEP_{name.upper()}", "0") or 0)


def int_setting(name: str, default: int) -> int:
    """``UNIRET_TEST_<NAME>`` as an int when set (tests shrink batch or commit sizes), else ``default``."""
    value = os.environ.get(f"{PREFIX}{name.upper()}", "")
    return int(value) if value.strip() else default


def interrupt_point(name: str, step: int) -> None:
    """Raise KeyboardInterrupt (a simulated Ctrl-C) when ``UNIRET_TEST_INTERRUPT_<NAME>`` equals ``step``."""
    value = os.environ.get(f"{PREFIX}INTERRUPT_{name.upper()}", "").strip()
    if value and int(value) == step:
        raise KeyboardInterrupt
