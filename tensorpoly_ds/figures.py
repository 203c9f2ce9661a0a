"""Writing matplotlib figures: atomically (temp file, then rename), and closed afterwards so that long
report and replication runs do not accumulate open figures."""

from __future__ import annotations

from pathlib import Path

from tpds_common.files import atomic_output


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
