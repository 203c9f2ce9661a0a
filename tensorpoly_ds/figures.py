"""Writing matplotlib figures: atomically (temp file, then rename), and closed afterwards so that long
report and replication runs do not accumulate open figures."""

from __future__ import annotations

import os
from pathlib import Path


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path
