"""Quantized base vs float base, side by side from one `tools/bench_memory.py` run (issue 15).

`pairs_table(results)` -> markdown rows comparing each quantized configuration with the float
configuration of the same model and shapes measured in the same run (ratios of load peak,
process peak (ru_maxrss) and killable-memory peak (RssAnon + RssShmem), first-step loss);
`pairs_plot(results, path)` draws the same as bars. Used by `bench_memory.py` for the section
between the `bench_memory_pairs` markers of docs/memory.md and for docs/bench_memory_pairs.png.
"""
from __future__ import annotations

from pathlib import Path

M = 2**20
# (float configuration, [quantized configurations of the same model and shapes])
PAIRS = [
    ("llama400m-fp32-r8-b1-s128-ckpt", ["llama400m-nf4-r8-b1-s128-ckpt", "llama400m-int4-r8-b1-s128-ckpt"]),
    ("smollm2-floor-lora-fp32", ["smollm2-floor-lora-nf4", "smollm2-floor-lora-int8"]),
    ("smollm2-floor-zo", ["smollm2-floor-zo-nf4"]),
    ("smollm2-r8-b2-s64", ["smollm2-nf4-r8-b2-s64"]),
]
HEAD = ["quantized config", "float config", "load peak MiB (q / float)", "process peak MiB (q / float)",
        "peak ratio", "anon peak ratio", "first-step loss (q / float)", "predicted peak error (q / float)"]


def _pair_rows(results: list[dict]) -> list[tuple[dict, dict]]:
    by = {r["name"]: r for r in results}
    return [(by[q], by[f]) for f, qs in PAIRS for q in qs if q in by and f in by]


def _loss(r: dict) -> str:
    return f"{r['first_loss']:.5f}" if r.get("first_loss") is not None else "—"


def pairs_table(results: list[dict]) -> list[list[str]]:
    """One row per (quantized, float) pair present in `results`."""
    out = []
    for q, f in _pair_rows(results):
        anon = (f"{q['anon_peak'] / f['anon_peak']:.2f}" if q.get("anon_peak") and f.get("anon_peak") else "—")
        out.append([q["name"], f["name"], f"{q['load_peak_rss'] / M:.0f} / {f['load_peak_rss'] / M:.0f}",
                    f"{q['peak_rss'] / M:.0f} / {f['peak_rss'] / M:.0f}", f"{q['peak_rss'] / f['peak_rss']:.2f}", anon,
                    f"{_loss(q)} / {_loss(f)}", f"{q['error_pct']:+.1f}% / {f['error_pct']:+.1f}%"])
    return out


def pairs_plot(results: list[dict], path: Path) -> None:
    """Process peak and load peak of each pair (MiB), quantized next to float."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = _pair_rows(results)
    if not pairs:
        return
    fig, ax = plt.subplots(figsize=(9, 0.8 * len(pairs) + 1.4))
    for i, (q, f) in enumerate(pairs):
        ax.barh(i + 0.2, f["peak_rss"] / M, height=0.38, color="tab:gray", label="float base" if i == 0 else None)
        ax.barh(i - 0.2, q["peak_rss"] / M, height=0.38, color="tab:blue", label="quantized base" if i == 0 else None)
        for y, r in ((i + 0.2, f), (i - 0.2, q)):
            ax.plot([r["load_peak_rss"] / M] * 2, [y - 0.19, y + 0.19], color="k")
        ax.text(max(q["peak_rss"], f["peak_rss"]) / M + 20, i, f"x{q['peak_rss'] / f['peak_rss']:.2f}", va="center")
    ax.set_yticks(range(len(pairs)), [q["name"] for q, _ in pairs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("peak RSS, MiB (black tick: peak at the end of the load)")
    ax.set_title("Quantized vs float base, one run, same shapes (ratio = quantized / float)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
