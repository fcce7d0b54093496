"""The one test seam: hooks that let tests interrupt or shrink a real run, set through ``UNIRET_TEST_*``.

Product code calls these functions at the few points a test needs to reach; nothing else in uniret
reads test-only environment variables. Unset (as for every user), each hook is a no-op. The
variables are read at call time, so a test can set them for one subprocess or with
``monkeypatch.setenv``.

==================================  ==========================================================
``UNIRET_TEST_INTERRUPT_TRAIN``     a step number: ``uniret train`` raises KeyboardInterrupt
                                    (a simulated Ctrl-C) before it starts that step
==================================  ==========================================================
"""

from __future__ import annotations

import os

PREFIX = "UNIRET_TEST_"


def interrupt_point(name: str, step: int) -> None:
    """Raise KeyboardInterrupt at ``step`` when ``UNIRET_TEST_INTERRUPT_<NAME>`` equals it."""
    value = os.environ.get(f"{PREFIX}INTERRUPT_{name.upper()}", "").strip()
    if value and int(value) == step:
        raise KeyboardInterrupt(f"{PREFIX}INTERRUPT_{name.upper()}={value}")
