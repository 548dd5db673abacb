"""matplotlib is optional (the `bench` extra): plots are made when it is installed, and skipped with
one line naming the extra when it is not — the JSON and markdown beside them have every value."""

from __future__ import annotations

import sys
from typing import Any

EXTRA_HINT = "pip install 'deepseek-model[bench]'"


def pyplot(what: str) -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None after printing which plot is skipped and why.

    Args:
        what: the plot file (or a short description) for the message.
    """
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print(f"matplotlib is not installed ({EXTRA_HINT}): no {what}; the JSON and markdown have every value",
              file=sys.stderr)
        return None
    return plt
