"""Run reports: loss curve and memory-by-category chart (PNG) plus a one-page HTML, from a run directory."""

from __future__ import annotations

import html
import json
from pathlib import Path

from memfit.errors import MemfitError
from memfit.memory.breakdown import CATEGORIES, MemoryBreakdown, format_bytes


def load_run(run_dir: Path) -> tuple[list[dict], dict]:
    run_dir = Path(run_dir)
    if not (run_dir / "memory.json").exists():
        raise MemfitError(f"{run_dir} is not a finished memfit run (no memory.json); pass a run directory")
    metrics_path = run_dir / "metrics.jsonl"
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return history, json.loads((run_dir / "memory.json").read_text())


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in history if "loss" in r]
    ax.plot(steps, [r["loss"] for r in history if "loss" in r], label="train loss")
    evals = [r for r in history if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimate = MemoryBreakdown.from_dict(summary["estimate"])
    measured = MemoryBreakdown.from_dict(summary["measured"]["peak"]) if summary.get("measured") else None
    cats = [c for c in CATEGORIES if getattr(estimate, c) or (measured and getattr(measured, c))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(cats))
    ax.bar([x - 0.2 for x in xs], [getattr(estimate, c) / 2**20 for c in cats], 0.4, label="estimate")
    if measured:
        ax.bar([x + 0.2 for x in xs], [getattr(measured, c) / 2**20 for c in cats], 0.4, label="measured @ peak")
    ax.set_xticks(list(xs), cats, rotation=30)
    ax.set_ylabel("MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: Path) -> Path:
    """Write loss.png, memory.png and report.html into the run directory; return the HTML path."""
    run_dir = Path(run_dir)
    history, summary = load_run(run_dir)
    if history:
        plot_loss(history, run_dir / "loss.png")
    plot_memory(summary, run_dir / "memory.png")
    rows = []
    est = MemoryBreakdown.from_dict(summary["estimate"])
    meas = MemoryBreakdown.from_dict(summary["measured"]["peak"]) if summary.get("measured") else None
    for c in CATEGORIES:
        e, m = getattr(est, c), getattr(meas, c) if meas else 0
        if e or m:
            rows.append(f"<tr><td>{c}</td><td>{format_bytes(e)}</td><td>{format_bytes(m) if meas else '-'}</td></tr>")
    metrics = "".join(f"<li>{html.escape(k)}: {v:.4g}</li>" for k, v in summary["metrics"].items())
    process = summary.get("measured", {}) or {}
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>memfit run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:760px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}</style>
</head><body><h1>memfit run: {html.escape(run_dir.name)}</h1>
<h2>Quality</h2><ul>{metrics}<li>tokens/s: {summary['tokens_per_s']:.1f}</li>
<li>trainable / total parameters: {summary['trainable_params']:,} / {summary['total_params']:,}</li></ul>
<h2>Memory by category</h2><table><tr><th>category</th><th>estimate</th><th>measured @ peak</th></tr>{''.join(rows)}
<tr><td>process peak</td><td></td><td>{format_bytes(process.get('process_peak') or 0)}</td></tr></table>
<img src="memory.png"><h2>Loss</h2><img src="loss.png"></body></html>"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out
