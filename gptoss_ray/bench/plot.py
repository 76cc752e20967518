"""Latency against throughput, one line per server: the picture a serving comparison needs.

matplotlib is imported inside `plot_series` only: the load generator itself must run
where matplotlib is not installed.

    python -m gptoss_ray.bench.plot OUT.png gptoss-ray=ours.json peer=peer.json [--title=TEXT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptoss_ray.errors import GptOssError

# (metric key prefix, panel title): each panel plots p50 (solid) and p99 (dashed).
_PANELS = (("ttft", "time to first token"), ("itl", "inter-token latency"), ("e2e_latency", "end-to-end latency"))


def plot_series(series: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """`series` maps a label to the runs of one sweep (dicts from `summarize`); x is
    output tokens/s, each point is annotated with its concurrency, or its request rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptOssError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.2 * len(_PANELS), 3.6), dpi=80)
    for ax, (key, panel_title) in zip(axes, _PANELS):
        for i, (label, runs) in enumerate(series.items()):
            color = f"C{i}"
            xs = [r["output_throughput_tok_s"] for r in runs]
            for pct, style in ((50, "-o"), (99, "--x")):
                ys = [r.get(f"{key}_p{pct}_ms") for r in runs]
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{label} p{pct}", markersize=4)
            for r in runs:
                y = r.get(f"{key}_p50_ms")
                if y is not None:
                    ax.annotate(_point_label(r), (r["output_throughput_tok_s"], y), fontsize=6,
                                textcoords="offset points", xytext=(3, 3), color=color)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("output tokens/s", fontsize=8)
        ax.set_ylabel("ms (log scale)", fontsize=8)
        ax.set_yscale("log")  # queueing makes latencies span orders of magnitude
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _point_label(run: dict) -> str:
    rate = run.get("request_rate")
    return f"{rate:g}/s" if rate is not None else f"c{run['concurrency']}"


def main(argv: list[str]) -> int:
    """Plot several `gptoss-ray bench --output` files (LABEL=FILE.json) on one figure."""
    title = next((a.split("=", 1)[1] for a in argv if a.startswith("--title=")), "")
    argv = [a for a in argv if not a.startswith("--title=")]
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print("usage: python -m gptoss_ray.bench.plot OUT.png LABEL=RESULT.json [...] [--title=TEXT]", file=sys.stderr)
        return 2
    series = {}
    for arg in argv[1:]:
        label, file = arg.rsplit("=", 1)  # a label may hold "=", a file name rarely does
        series[label] = json.loads(Path(file).read_text())["runs"]
    plot_series(series, argv[0], title)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
