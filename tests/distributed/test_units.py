"""The FSDP2 pieces that need no process group: precision policies, block discovery, the shard layout, the
8-bit placement rule, the per-rank byte formulas, the launcher's command."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from memfit.distributed.collectives import row_range
from memfit.memory.sharding import sharded_bytes, unit_bytes, units_from_params
from memfit.distributed.optim import LOCAL, OWNER, _eight_bit, rule_for
from memfit.distributed.runtime import init_distributed, launch_command
from memfit.distributed.shard import find_blocks, precision_policy, shard_model
from memfit.errors import ConfigError
from memfit.memory.spec import ParamInfo, model_shape
from tests.distributed import harness as H


@pytest.mark.parametrize("name, param, reduce", [
    ("32-true", torch.float32, torch.float32), ("bf16-mixed", torch.bfloat16, torch.float32),
    ("bf16-true", torch.bfloat16, torch.float32), ("16-mixed", torch.float16, torch.float32),
    ("16-true", torch.float16, torch.float32)])
def test_precision_names_map_to_policies(name, param, reduce):
    policy = precision_policy(name)
    assert (policy.param_dtype, policy.reduce_dtype) == (param, reduce)


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        precision_policy("fp8")


def test_blocks_of_decoder_encoder_and_plain_models():
    assert [n for n, _ in find_blocks(H.tiny())] == ["model.layers.0", "model.layers.1"]
    bert = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=32))
    assert [n for n, _ in find_blocks(bert)] == [f"encoder.layer.{i}" for i in range(3)]
    plain = nn.Sequential(nn.Embedding(4, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(2)]))
    assert [n for n, _ in find_blocks(plain)] == ["1.0", "1.1"]


def test_model_without_blocks_is_refused():
    with pytest.raises(ConfigError, match="no repeated blocks"):
        shard_model(nn.Linear(4, 4), mesh=None)


@pytest.mark.parametrize("rows, world", [(7, 2), (3, 4), (64, 2), (5, 3)])
def test_row_range_is_torch_chunk(rows, world):
    chunks = torch.arange(rows).chunk(world)
    for rank in range(world):
        start, end = row_range(rows, world, rank)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, end)) == expected


def test_eight_bit_state_is_chosen_by_the_global_size():
    group = {"min_8bit_size": 4096, "block_size": 256}
    # 6 x 1024 = 6,144 values: 8-bit whatever the world size (torchao #4912 picks fp32 for 3,072-value shards)
    assert _eight_bit(torch.empty(6, 1024), group) == (LOCAL, {"min_8bit_size": 0})
    assert _eight_bit(torch.empty(4, 512), group) == (LOCAL, {})  # 2,048 values: fp32 moments everywhere
    assert _eight_bit(torch.empty(64, 100), group) == (OWNER, {})  # blocks would straddle shards: whole matrix


def test_optimizer_without_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="Adagrad has no FSDP2 placement rule"):
        rule_for(torch.optim.Adagrad([nn.Parameter(torch.zeros(2))]))


def test_unit_bytes_pad_each_shard():
    p = ParamInfo("w", (3, 4), 4)  # 3 rows on 2 ranks: every rank stores ceil(3/2) = 2 rows
    unit = unit_bytes([p], world=2)
    assert unit.sharded_params == 2 * 4 * 4 and unit.all_gather == unit.params == 4 * 4 * 4
    assert unit.grads == 3 * 4 * 4  # autograd's gradient has the parameter's own shape
    frozen = unit_bytes([ParamInfo("w", (4, 4), 2, trainable=False)], world=2, compute_bytes=4)
    assert frozen.grads == 0 and frozen.sharded_params == 2 * 4 * 2 and frozen.params == 16 * 4


def test_sharded_bytes_by_hand():
    root = [ParamInfo("embed", (8, 4), 4)]
    blocks = [[ParamInfo(f"layers.{i}.w", (4, 4), 4)] for i in range(3)]
    state = 123
    zero3 = sharded_bytes(root, blocks, 2, state, reshard_after_forward=True)
    b, r = 64, 128  # bytes of a block, of the root; shards are half
    held = (r + 3 * b) // 2 + state
    assert zero3["parameters"] == zero3["gradients"] == (r + 3 * b) // 2
    # backward of block 1: root + block 1 + block 0's all-gather + block 1's grads + block 2's reduce-scatter input
    # + block 2's gradient shard
    assert zero3["model_state_peak"] == held + r + b + b + b + b + b // 2
    zero2 = sharded_bytes(root, blocks, 2, state, reshard_after_forward=False)
    # forward of block 2: root + blocks 0, 1, 2 + the all-gather outputs of blocks 1 and 2
    assert zero2["model_state_peak"] == held + r + 3 * b + 2 * b


def test_units_follow_block_names():
    shape = model_shape(H.tiny())
    root, blocks = units_from_params(shape.params, [n for n, _ in find_blocks(H.tiny())])
    assert {p.name for p in root} == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert all(p.name.startswith(f"model.layers.{i}.") for i, b in enumerate(blocks) for p in b)


def test_launch_command_is_torchrun():
    cmd = launch_command(["train", "r.yaml"], 4)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert cmd[5:] == ["-m", "memfit", "train", "r.yaml"]
    with pytest.raises(ConfigError):
        launch_command([], 0)


def test_init_without_torchrun_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        init_distributed()
