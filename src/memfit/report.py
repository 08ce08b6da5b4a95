"""What a run tells its user, on the terminal and in files: the final line (metrics, speed, parameters), the memory
table (measured at the peak, each category's own maximum, the estimate and their ratio), and `loss.png`,
`memory.png` and `report.html` in the run directory. `memfit train`, `memfit report` and `memfit quickstart`
all print through `print_result`, and the HTML page shows the very table the terminal shows.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

from memfit.errors import RunDirError
from memfit.memory.breakdown import TENSOR_CATEGORIES, MemoryBreakdown
from memfit.progress import note
from memfit.rundir import METRICS, read_log, write_text_atomic, writing


def load_run(run_dir: Path) -> tuple[list[dict], dict]:
    """(metrics history, summary from memory.json) of a finished run."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "memory.json"
    if not summary_path.is_file():
        raise RunDirError(f"{run_dir} is not a finished memfit run (no memory.json); pass a run directory")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict) or "estimate" not in summary or "metrics" not in summary:
            raise ValueError("no estimate or metrics in it")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{summary_path} is damaged ({exc}); finish the run again with `memfit train RECIPE "
                          f"-o {run_dir} --resume` to rewrite it") from None
    history, torn = read_log(run_dir / METRICS)
    if torn:
        note(f"{run_dir / METRICS} ends in a line cut short; the report leaves it out")
    return history, summary


def final_line(metrics: dict[str, float], tokens_per_s: float, trainable: int, total: int) -> str:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) or "no evaluation set"
    return f"final: {shown}  |  {tokens_per_s:.0f} tokens/s  |  trainable {trainable:,} / {total:,} params"


def rank_lines(notes: dict[str, Any]) -> list[str]:
    """One line per rank of a distributed run (`memfit train --nproc N`): its tensor peak, the part of it that is
    parameters + gradients + optimizer state + FSDP2's gathered blocks and buffers, and its process peak."""
    from memfit.memory.breakdown import format_bytes

    lines = []
    for r in notes.get("ranks", []):
        process = f", process peak {format_bytes(r['process_peak'])}" if r.get("process_peak") else ""
        lines.append(f"rank {r['rank']}: tensor peak {format_bytes(r['tensor_peak'])} (model state peak "
                     f"{format_bytes(r['model_state_peak'])}){process}")
    return lines


def memory_table(summary: dict[str, Any]):
    """The measured-vs-estimate table of a summary (memory.json), or None when the run measured nothing."""
    from memfit.memory.measure import MemoryReport

    if not summary.get("measured"):
        return None
    measured = MemoryReport.from_dict(summary["measured"])
    return measured.table(MemoryBreakdown.from_dict(summary["estimate"]),
                          estimate_peak=summary.get("estimate_peak") or None)


def print_result(result, console) -> None:
    """The memory table and the final line of a `RunResult`, then where its files are."""
    if result.memory is not None:
        console.print(result.memory.table(result.estimate, estimate_peak=result.estimate_peak or None))
        for line in rank_lines(result.memory.notes):
            console.print(line)
        if result.memory.notes.get("compile"):
            console.print(f"note: {result.memory.notes['compile']}")
    console.print(final_line(result.metrics, result.tokens_per_s, result.trainable_params, result.total_params))
    if result.run_dir is not None:
        console.print(f"run directory: {result.run_dir}  (report: {result.run_dir / 'report.html'})")


def print_run(run_dir: Path, console) -> Path:
    """`memfit report`: write the run's plots and HTML page, print its table and final line; return the page."""
    _, summary = load_run(run_dir)
    path = write_report(run_dir)
    table = memory_table(summary)
    if table is not None:
        console.print(table)
    console.print(final_line(summary["metrics"], summary.get("tokens_per_s", 0.0),
                             summary.get("trainable_params", 0), summary.get("total_params", 0)))
    console.print(f"report: {path}")
    return path


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
    _save(fig, ax, "loss", path)


def _save(fig, ax, ylabel: str, path: Path) -> None:
    """Label, lay out and write a figure atomically, then free it."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(summary: dict, path: Path) -> None:
    """Estimate next to each category's measured maximum: both are per-category peaks (at the step's overall peak
    some categories are empty — gradients before backward — which would read as a wrong estimate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimate = MemoryBreakdown.from_dict(summary["estimate"])
    run = summary.get("measured") or {}
    measured = MemoryBreakdown.from_dict(run.get("category_peaks") or run["peak"]) if run else None
    cats = [c for c in TENSOR_CATEGORIES if getattr(estimate, c) or (measured and getattr(measured, c))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(cats))
    ax.bar([x - 0.2 for x in xs], [getattr(estimate, c) / 2**20 for c in cats], 0.4, label="estimate")
    if measured:
        ax.bar([x + 0.2 for x in xs], [getattr(measured, c) / 2**20 for c in cats], 0.4,
               label="measured (category max)")
    ax.set_xticks(list(xs), cats, rotation=30)
    _save(fig, ax, "MiB", path)


def _table_html(table) -> str:
    """A rich table as HTML, cell for cell what the terminal shows."""
    from rich.console import Console

    console = Console(record=True, file=io.StringIO(), width=120, force_terminal=True, color_system="truecolor")
    console.print(table)
    return console.export_html(inline_styles=True, code_format="<pre style=\"font-size:13px\">{code}</pre>")


def write_report(run_dir: Path) -> Path:
    """Write loss.png, memory.png and report.html into the run directory; return the HTML path."""
    run_dir = Path(run_dir)
    history, summary = load_run(run_dir)
    if history:
        plot_loss(history, run_dir / "loss.png")
    plot_memory(summary, run_dir / "memory.png")
    table = memory_table(summary)
    memory = _table_html(table) if table is not None else "<p>This run measured no step (train.measure_steps=0).</p>"
    metrics = "".join(f"<li>{html.escape(k)}: {v:.4g}</li>" for k, v in summary["metrics"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>memfit run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}</style>
</head><body><h1>memfit run: {html.escape(run_dir.name)}</h1>
<h2>Quality</h2><ul>{metrics}<li>tokens/s: {summary.get('tokens_per_s', 0.0):.1f}</li>
<li>trainable / total parameters: {summary.get('trainable_params', 0):,} / {summary.get('total_params', 0):,}</li></ul>
<h2>Memory by category</h2>{memory}
<img src="memory.png"><h2>Loss</h2><img src="loss.png"></body></html>"""
    out = run_dir / "report.html"
    write_text_atomic(out, page)
    return out
