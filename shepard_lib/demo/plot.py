"""``shepard demo --plot FILE``: healthy instances over time, one line per run (needs matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shepard_lib.demo.runner import DemoOptions, RunResult

__all__ = ["PlotUnavailable", "write_plot"]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed (``pip install 'shepard[demo]'``)."""


def write_plot(path: Path, results: Sequence[RunResult], options: DemoOptions) -> None:
    """Write a PNG timeline of every run to ``path``; raises :class:`PlotUnavailable` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("the plot needs matplotlib: pip install 'shepard[demo]'") from exc
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for result in results:
        times = [t for t, _ in result.series]
        healthy = [h for _, h in result.series]
        style = "--" if result.spec.bad_config else "-"
        ax.step(
            times,
            healthy,
            where="post",
            linestyle=style,
            linewidth=2,
            label=result.spec.name.replace("_", " "),
        )
    floor = options.allocations - options.concurrency
    ax.axhline(floor, color="grey", linestyle=":", linewidth=1.5, label=f"N - c = {floor} (Shepard's floor)")
    ax.set_xlabel("cluster seconds since the config change")
    ax.set_ylabel("healthy instances")
    ax.set_ylim(-0.5, options.allocations + 1)
    ax.set_title(
        f"{options.allocations} instances, one config change: Nomad alone, splay {options.splay:g}s, "
        f"Shepard (c = {options.concurrency})"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
