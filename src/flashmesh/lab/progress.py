"""Progress lines for steps that take more than a few seconds."""

from __future__ import annotations

import sys
import time


def say(message: str) -> None:
    print(f"[lab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
