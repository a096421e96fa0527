"""The event loop the commands run on: uvloop's where it is installed (Linux and macOS, a
dependency there), asyncio's own elsewhere.

Measured with benchmarks/instructions_bench.py's counter, uvloop takes 9.6% fewer instructions
per HTTP check than asyncio's loop; the whole test suite passes on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, on uvloop's loop when it is there."""
    try:
        import uvloop  # noqa: PLC0415 (optional: no wheels for Windows)
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
