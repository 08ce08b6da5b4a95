"""Optimizer state on disk (`memfit.optim.offload`): bit-equal to the in-memory optimizer, the state really in the
files (none in the optimizer between steps, the files' pages released from the process), files cleaned up, the
estimate's staged state, exact resume through the run loop, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.measure import state_bytes
from memfit.optim.offload import STATE_DIR, DiskOffloadTechnique, DiskStateOptimizer, offload_units
from memfit.recipe import load_recipe
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from tests.optim.helpers import batches, tiny, train
from tests.train.recipes import resumed_losses_match, toy_recipe

SPECS = {
    "adamw": {"name": "adamw"},
    "adamw_loop": {"name": "adamw", "fused": False},
    "adamw_8bit": {"name": "adamw_8bit", "block_size": 64, "min_8bit_size": 1024},
    "adam_mini": {"name": "adam_mini"},
    "sgd_momentum": {"name": "sgd", "momentum": 0.9},
    "galore": {"name": "galore", "rank": 8, "update_proj_gap": 3},
    "apollo": {"name": "apollo", "rank": 8, "update_proj_gap": 3},
    "frugal": {"name": "frugal", "rank": 8, "update_proj_gap": 3},
    "scale": {"name": "scale"},
}


def _run(spec: dict, disk: bool, steps: int = 6):
    torch.manual_seed(0)
    model = tiny()
    opt = build_technique("optimizer", spec).build_optimizer(Context(model=model, spec=None))
    if disk:
        opt = DiskStateOptimizer(opt, model)
    return train(model, opt, batches(steps)), model, opt


@pytest.mark.parametrize("name", list(SPECS))
def test_losses_and_weights_bit_equal_in_memory(name):
    losses, model, _ = _run(SPECS[name], disk=False)
    disk_losses, disk_model, opt = _run(SPECS[name], disk=True)
    assert disk_losses == losses
    for (n, a), b in zip(model.named_parameters(), disk_model.parameters()):
        assert torch.equal(a, b), n
    opt.close()


def _mapped_rss(folder) -> int:
    """Resident bytes of this process's mappings of files in `folder` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5].startswith(str(folder))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_state_lives_in_the_files_and_leaves_the_process():
    _, model, reference = _run(SPECS["adamw"], disk=False, steps=2)
    _, _, opt = _run(SPECS["adamw"], disk=True, steps=2)
    folder = opt.folder
    files = sorted(folder.glob("unit-*.bin"))
    assert len(files) == len(opt.units) == len(offload_units([n for n, _ in model.named_parameters()]))
    assert state_bytes(opt) == 0 and not opt.state  # nothing held by the optimizer between steps
    assert opt.offloaded_bytes() >= state_bytes(reference)  # every moment and counter is in a file (aligned)
    assert _mapped_rss(folder) == 0  # each unit's pages were released after its step
    state = opt.state_dict()["state"]  # the in-memory optimizer's own format, read from the files
    ref_state = reference.state_dict()["state"]
    assert state.keys() == ref_state.keys()
    for i in state:
        for key, value in ref_state[i].items():
            assert torch.equal(state[i][key], value), (i, key)
    del state
    opt.close()
    assert not folder.exists()


def test_load_state_dict_resumes_exactly():
    data = batches(6)
    torch.manual_seed(0)
    model = tiny()
    opt = DiskStateOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
    train(model, opt, data[:3])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    opt_saved = opt.state_dict()
    opt_saved = {**opt_saved,
                 "state": {i: {k: v.clone() for k, v in st.items()} for i, st in opt_saved["state"].items()}}
    after = train(model, opt, data[3:])
    torch.manual_seed(0)
    model2 = tiny()
    model2.load_state_dict(saved)
    opt2 = DiskStateOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-3), model2)
    opt2.load_state_dict(opt_saved)
    assert not opt2.state and opt2.offloaded_bytes() > 0
    assert train(model2, opt2, data[3:]) == after
    opt.close()
    opt2.close()


def test_estimate_holds_two_units_of_state():
    recipe = load_recipe(_toy_recipe_dict("adamw"))
    technique = next(t for t in recipe.techniques() if t.slot == "optimizer")
    assert isinstance(technique, DiskOffloadTechnique)
    from memfit.train.build import build_run

    built = build_run(recipe)
    spec = built.spec
    whole = technique.inner.estimate(spec, MemoryBreakdown()).optimizer
    units = technique.unit_state_bytes(spec)
    assert sum(units) == whole  # AdamW's state splits exactly over the units
    staged = technique.estimate(spec, MemoryBreakdown()).optimizer
    assert staged == max(a + max(a, b) for a, b in zip(units, units[1:] + [0])) < whole
    assert technique.transform_spec(spec).extra["optimizer_offloaded"] == whole
    opt = built.ctx.optimizer
    assert isinstance(opt, DiskStateOptimizer)
    for p in built.ctx.model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    # the files hold exactly what the estimate put there (each tensor padded to 64 bytes)
    slots = [s for f in opt.files.units.values() for t in f.templates.values() for s in t.values()
             if hasattr(s, "nbytes")]
    assert sum(s.nbytes for s in slots) == whole
    opt.close()


def _toy_recipe_dict(optimizer: str, **extra):
    from tests.conftest import DATA

    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    recipe = toy_recipe("pretrain", DATA, steps=6, save_every=3, eval_every=0)
    return {**recipe, "optimizer": {"name": optimizer, "offload": "disk", **extra}}


def test_run_loop_keeps_files_in_the_run_dir_and_resumes_exactly(tmp_path, monkeypatch):
    from memfit.optim import offload
    from memfit.train import train as run

    seen = []
    real_take = offload.DiskStateOptimizer._take

    def spy(self, u):  # record where the files are while the run steps
        real_take(self, u)
        seen.append(sorted(p.name for p in self.folder.iterdir()))

    monkeypatch.setattr(offload.DiskStateOptimizer, "_take", spy)
    recipe = load_recipe(_toy_recipe_dict("adamw"))
    result = run(recipe, tmp_path / "disk", quiet=True)
    assert seen and seen[-1][0].startswith("unit-")
    assert not (tmp_path / "disk" / STATE_DIR).exists()  # removed at the end of the run
    plain = load_recipe({**_toy_recipe_dict("adamw"), "optimizer": {"name": "adamw"}})
    assert [r["loss"] for r in result.history] == [r["loss"] for r in run(plain, None, quiet=True).history]
    monkeypatch.undo()
    assert resumed_losses_match(recipe, tmp_path / "resume")
    metrics = (tmp_path / "disk" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["final"]


@pytest.mark.parametrize("extra, message", [
    ({"layerwise": True}, "inside backward"),
    ({"state_dtype": "bf16"}, "state_dtype"),
])
def test_refused_combinations(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_toy_recipe_dict("adamw", **extra))


def test_in_backward_optimizer_is_refused():
    with pytest.raises(ConfigError, match="lomo.*offload"):  # LOMO's config has no offload key
        load_recipe({**_toy_recipe_dict("adamw"), "optimizer": {"name": "lomo", "offload": "disk"}})


def test_units_are_blocks_then_each_other_parameter():
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.0.b.weight",
             "model.layers.1.a.weight", "model.norm.weight", "lm_head.weight"]
    assert offload_units(names) == [["model.layers.0.a.weight", "model.layers.0.b.weight"],
                                    ["model.layers.1.a.weight"], ["model.embed_tokens.weight"],
                                    ["model.norm.weight"], ["lm_head.weight"]]


def test_popping_a_parameters_state_drops_it_on_disk_too():
    """LISA / BAdam free a deactivated layer's state with `optimizer.state.pop(p)`: it must restart from zero, as
    in memory."""
    data = batches(6)
    runs = []
    for disk in (False, True):
        torch.manual_seed(0)
        model = tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if disk:
            opt = DiskStateOptimizer(opt, model)
        losses = train(model, opt, data[:3])
        for p in model.model.layers[0].parameters():
            opt.state.pop(p, None)
        runs.append(losses + train(model, opt, data[3:]))
        if disk:
            opt.close()
    assert runs[0] == runs[1]
