"""What runs tell the user: `memfit report` prints lines, not a dict; the HTML page shows the terminal's table
(category maxima included); piped runs print progress lines; `memfit generate` times decoding without the
memory tracker; `python -m memfit` is the CLI."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import torch
import yaml
from typer.testing import CliRunner

from memfit.cli import app

from .recipes import toy_recipe


def test_report_progress_and_html_table(tmp_path, data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(toy_recipe("pretrain", data_dir, steps=2, log_every=1)))
    run = tmp_path / "run"
    trained = CliRunner().invoke(app, ["train", str(recipe), "-o", str(run)])
    assert trained.exit_code == 0, trained.output
    # CliRunner's output is no terminal: progress comes as plain lines, not a live bar shown only at the end
    assert "pretrain: step 1/2 loss" in trained.output and "pretrain: step 2/2 loss" in trained.output
    assert "final evaluation: batch" in trained.output

    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert not result.output.lstrip().startswith("{") and "final: eval_loss=" in result.output
    page = (run / "report.html").read_text()
    table = html.unescape(re.sub(r"<[^>]+>", "", re.search(r"<pre.*?</pre>", page, re.S).group(0)))
    assert "category max" in table
    grad_row = next(line for line in table.splitlines() if "gradients" in line)
    terminal_row = next(line for line in result.output.splitlines() if "gradients" in line)
    cells = [c.strip() for c in grad_row.split("│")[1:-1]]  # category, at peak, category max, estimate, max/est
    assert cells == [c.strip() for c in terminal_row.split("│")[1:-1]]  # the terminal's very cells
    assert cells[2] != "0 B" and cells[2] == cells[3]  # gradients' maximum, as estimated (not the 0 B at the peak)


def test_generate_times_decoding_without_the_tracker():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from memfit.generate import generate
    from memfit.models import build_llama

    model = build_llama("llama-tiny", 64, seed=0)
    tracked: list[bool] = []
    model.register_forward_hook(lambda *_: tracked.append(_get_current_dispatch_mode() is not None))
    result = generate(model, torch.arange(1, 20)[None], 6)
    half = len(tracked) // 2
    assert tracked == [True] * half + [False] * half  # measured pass first, then the timed pass untracked
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    assert result.tokens_per_s == (result.new_tokens - 1) / result.decode_seconds
    assert result.seconds == result.prefill_seconds + result.decode_seconds


def test_python_dash_m_memfit():
    out = subprocess.run([sys.executable, "-m", "memfit", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "quickstart" in out.stdout, out.stderr
