"""`memfit bench speed`'s measuring parts: the profiler-based allocation peak, state bytes that include what
reference packages keep on helper objects, and a quick side-by-side run producing well-formed ratio rows."""

from __future__ import annotations

import pytest
import torch

from memfit.bench.harness import BenchOptions
from memfit.bench.suites import speed


def test_allocated_growth_sees_a_temporary_freed_inside_the_window():
    def fn():
        a = torch.ones(1 << 18)  # 1 MiB, freed before the next one: the peak is one of them
        del a
        b = torch.ones(1 << 18)
        del b

    growth = speed.allocated_growth(fn)
    assert (1 << 20) <= growth < (1 << 20) + (1 << 16)


def test_state_bytes_includes_projectors_on_objects():
    galore_torch = pytest.importorskip("galore_torch")
    layer = torch.nn.Linear(64, 32, bias=False)
    opt = galore_torch.GaLoreAdamW([{"params": [layer.weight], "rank": 4, "update_proj_gap": 10, "scale": 1.0,
                                     "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
    layer(torch.randn(2, 64)).sum().backward()
    opt.step()
    variant = speed.Variant("galore-torch", layer, lambda ids: None, lambda: None, opt)
    moments = sum(t.numel() * 4 for t in opt.state[layer.weight].values() if isinstance(t, torch.Tensor))
    projector = opt.state[layer.weight]["projector"].ortho_matrix
    # storages, not views: galore-torch keeps a slice of the SVD's U, which holds all of U alive
    assert speed.state_bytes(variant) == moments + projector.untyped_storage().nbytes() > moments


def test_quick_run_rows(tmp_path):
    pytest.importorskip("lomo_optim")
    rows = speed.run(BenchOptions(quick=True, out_dir=tmp_path, only=["adamw", "lomo"], suite="speed"))
    by_ref = {r["reference"]: r for r in rows}
    assert set(by_ref) == {"torch AdamW foreach", "torch AdamW fused", "lomo-optim Lomo"}
    for row in rows:
        assert row["speed"] > 0 and 0.8 < row["step_peak_bytes"] < 1.25
    assert by_ref["torch AdamW fused"]["state_bytes"] == 1.0  # the same AdamW state
    assert by_ref["torch AdamW fused"]["opt_speed"] > 0
    lomo = by_ref["lomo-optim Lomo"]
    assert lomo["memfit_state_mib"] == lomo["ref_state_mib"] == 0 and "opt_speed" not in lomo
