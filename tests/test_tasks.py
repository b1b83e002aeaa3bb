"""Synthetic tasks: MQAR (Zoology) and selective copying (Mamba) generate what they promise."""

from __future__ import annotations

import pytest
import torch

from mixerzoo.tasks import (
    IGNORE_INDEX,
    MQARConfig,
    SelectiveCopyConfig,
    build_task,
    get_task_class,
    list_tasks,
    make_generator,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------- MQAR


def mqar_batch(device="cpu", **kw):
    cfg = MQARConfig(**{"vocab_size": 64, "seq_len": 48, "num_kv_pairs": 6, **kw})
    inputs, labels = cfg.sample(32, seed=3, device=device)
    return cfg, inputs, labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("random_non_queries", [False, True], ids=["zeros", "random"])
def test_mqar_shapes_dtypes_device(device, random_non_queries):
    cfg, inputs, labels = mqar_batch(device, random_non_queries=random_non_queries)
    assert inputs.shape == labels.shape == (32, 48)
    assert inputs.dtype == labels.dtype == torch.long
    assert inputs.device.type == labels.device.type == device
    assert inputs.min() >= 0 and inputs.max() < cfg.vocab_size


@pytest.mark.parametrize("random_non_queries", [False, True], ids=["zeros", "random"])
def test_mqar_keys_values_and_queries(random_non_queries):
    cfg, inputs, labels = mqar_batch(random_non_queries=random_non_queries)
    K, half, ctx = cfg.num_kv_pairs, cfg.vocab_size // 2, cfg.context_len
    keys, values = inputs[:, 0:ctx:2], inputs[:, 1:ctx:2]
    # Keys from [1, V/2), values from [V/2, V), each distinct within a sequence.
    assert ((keys >= 1) & (keys < half)).all()
    assert ((values >= half) & (values < cfg.vocab_size)).all()
    for b in range(inputs.shape[0]):
        assert len(set(keys[b].tolist())) == K and len(set(values[b].tolist())) == K
    # No loss inside the context; exactly K labelled positions after it, each a query slot.
    assert (labels[:, :ctx] == IGNORE_INDEX).all()
    mask = labels != IGNORE_INDEX
    assert (mask.sum(1) == K).all()
    pos = mask.nonzero()[:, 1]
    assert ((pos - ctx) % 2 == 0).all() and (pos >= ctx).all()
    # The token at each labelled position is a key, its label the value paired with it,
    # and every key of the sequence is queried exactly once.
    for b in range(inputs.shape[0]):
        pairs = dict(zip(keys[b].tolist(), values[b].tolist()))
        qpos = mask[b].nonzero().flatten()
        queried = inputs[b, qpos].tolist()
        assert sorted(queried) == sorted(pairs)
        assert labels[b, qpos].tolist() == [pairs[k] for k in queried]


def test_mqar_filler_is_zero_without_random_non_queries():
    cfg, inputs, labels = mqar_batch(random_non_queries=False)
    filler = labels == IGNORE_INDEX
    filler[:, : cfg.context_len] = False
    assert (inputs[filler] == 0).all()


def test_mqar_random_filler_covers_vocabulary():
    cfg, inputs, labels = mqar_batch(random_non_queries=True)
    filler = labels == IGNORE_INDEX
    filler[:, : cfg.context_len] = False
    tokens = inputs[filler]
    # Uniform over the whole vocabulary, so both halves (and 0 itself) show up.
    assert (tokens < cfg.vocab_size // 2).any() and (tokens >= cfg.vocab_size // 2).any()
    assert len(tokens.unique()) > cfg.vocab_size // 2


def test_mqar_matches_zoology_drawn_example():
    # The docstring example: 2 pairs, 16 tokens, 0-filled; queries two tokens apart.
    cfg = MQARConfig(vocab_size=12, seq_len=16, num_kv_pairs=2, random_non_queries=False)
    inputs, labels = cfg.sample(1, seed=0)
    assert inputs.tolist() == [[2, 8, 1, 6, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]]
    expected = [-100] * 16
    expected[4], expected[8] = 8, 6
    assert labels.tolist() == [expected]


def test_mqar_seeding():
    cfg = MQARConfig(vocab_size=256, seq_len=64, num_kv_pairs=8)
    a = cfg.sample(16, seed=7)
    b = cfg.sample(16, seed=7)
    c = cfg.sample(16, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # A stream is reproducible batch after batch, and successive batches differ.
    s1, s2 = cfg.build(5), cfg.build(5)
    x1, x2 = s1.sample(8), s1.sample(8)
    assert torch.equal(x1[0], s2.sample(8)[0]) and torch.equal(x2[0], s2.sample(8)[0])
    assert not torch.equal(x1[0], x2[0])


def test_mqar_gaps_follow_power_law():
    cfg = MQARConfig(vocab_size=512, seq_len=256, num_kv_pairs=4, random_non_queries=False)
    _, labels = cfg.sample(2000, seed=0)
    pos = (labels != IGNORE_INDEX).nonzero()[:, 1]
    gaps = (pos - cfg.context_len) // 2
    S = cfg.num_slots
    # a = 0.01 is close to p(g) ∝ 1/(g+1): short gaps dominate, long ones still occur.
    uniform_mean = (S - 1) / 2
    assert gaps.float().mean() < 0.6 * uniform_mean
    assert (gaps < S // 8).float().mean() > 0.4
    assert (gaps == 0).float().mean() > (gaps == S // 2).float().mean() * 4
    assert gaps.max() > S // 2
    # a = 1 is uniform: the mean gap lands near the middle.
    uni = MQARConfig(vocab_size=512, seq_len=256, num_kv_pairs=4, power_a=1.0)
    _, labels = uni.sample(2000, seed=0)
    g = ((labels != IGNORE_INDEX).nonzero()[:, 1] - uni.context_len) // 2
    assert abs(g.float().mean().item() - uniform_mean) < 0.1 * uniform_mean


def test_mqar_gap_probs_formula():
    cfg = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=2, power_a=0.5)
    p = cfg.gap_probs()
    g = torch.arange(1, cfg.num_slots + 1, dtype=torch.float64)
    ref = 0.5 * g**-0.5
    assert torch.allclose(p, ref / ref.sum())
    assert abs(p.sum().item() - 1) < 1e-12


def test_mqar_tightest_fit_and_passes():
    # 2K tokens of context + K slots of two tokens: the smallest legal length.
    cfg = MQARConfig(vocab_size=32, seq_len=16, num_kv_pairs=4, random_non_queries=False)
    inputs, labels = cfg.sample(64, seed=0)
    assert ((labels != IGNORE_INDEX).sum(1) == 4).all()
    # Odd lengths work; the last token never carries a label.
    odd = MQARConfig(vocab_size=32, seq_len=17, num_kv_pairs=4)
    _, labels = odd.sample(64, seed=0)
    assert (labels[:, -1] == IGNORE_INDEX).all() and ((labels != IGNORE_INDEX).sum(1) == 4).all()
    # Two passes repeat the key-value block before the queries.
    two = MQARConfig(vocab_size=32, seq_len=40, num_kv_pairs=4, num_passes=2,
                     random_non_queries=False)
    inputs, labels = two.sample(8, seed=0)
    assert torch.equal(inputs[:, :8], inputs[:, 8:16])
    assert (labels[:, :16] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(seq_len=15, num_kv_pairs=4), "seq_len=15"),
        (dict(vocab_size=8, num_kv_pairs=4), "vocab_size=8"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(power_a=0.0), "power_a"),
        (dict(seq_len=32, num_kv_pairs=4, num_passes=4), "passes"),
        (dict(vocab_size=64.0), "vocab_size"),
    ],
    ids=["short", "small-vocab", "no-pairs", "power-a", "passes", "float-vocab"],
)
def test_mqar_bad_configs(kw, match):
    base = dict(vocab_size=64, seq_len=32, num_kv_pairs=4)
    with pytest.raises(ValueError, match=match):
        MQARConfig(**{**base, **kw})


def test_unknown_fields_and_bad_sample_args():
    with pytest.raises(TypeError):
        MQARConfig(train_power_a=0.01)  # a misspelt field must not be dropped silently
    cfg = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4)
    with pytest.raises(ValueError, match="exactly one"):
        cfg.sample(4)
    with pytest.raises(ValueError, match="exactly one"):
        cfg.sample(4, seed=0, generator=make_generator(0))
    with pytest.raises(ValueError, match="batch_size"):
        cfg.sample(0, seed=0)
    with pytest.raises(TypeError, match="seed"):
        cfg.sample(2, seed=1.5)
    with pytest.raises(ValueError, match="same device type"):
        cfg.sample(2, generator=make_generator(0), device="cuda")


def test_generator_is_advanced_and_reused():
    cfg = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4)
    gen = make_generator(11)
    first = cfg.sample(4, generator=gen)[0]
    second = cfg.sample(4, generator=gen)[0]
    assert not torch.equal(first, second)
    gen2 = make_generator(11)
    assert torch.equal(first, cfg.sample(4, generator=gen2)[0])


# -------------------------------------------------------------------------- selective copy


@pytest.mark.parametrize("device", DEVICES)
def test_selective_copy_layout(device):
    cfg = SelectiveCopyConfig(vocab_size=16, seq_len=80, num_data_tokens=16)
    inputs, labels = cfg.sample(64, seed=1, device=device)
    assert inputs.shape == labels.shape == (64, 80)
    assert inputs.dtype == labels.dtype == torch.long and inputs.device.type == device
    R, M = cfg.region_len, cfg.num_data_tokens
    assert R == 64
    region = inputs[:, :R]
    data_mask = region != cfg.noise_token
    # Exactly M data tokens in the region, from the data range, then M markers.
    assert (data_mask.sum(1) == M).all()
    assert ((region[data_mask] >= 1) & (region[data_mask] <= cfg.vocab_size - 2)).all()
    assert (inputs[:, R:] == cfg.marker_token).all()
    assert cfg.marker_token == 15
    # Labels only at the markers, and they are the data tokens in order of appearance.
    assert (labels[:, :R] == IGNORE_INDEX).all()
    for b in range(inputs.shape[0]):
        assert labels[b, R:].tolist() == region[b][data_mask[b]].tolist()
    # Positions are scattered, not all at the start.
    starts_first = (data_mask[:, :M].sum(1) == M).float().mean()
    assert starts_first < 0.5


def test_selective_copy_drawn_example_and_plain_copy():
    cfg = SelectiveCopyConfig(vocab_size=6, seq_len=12, num_data_tokens=3)
    inputs, labels = cfg.sample(1, seed=0)
    assert inputs.tolist() == [[0, 0, 1, 0, 4, 0, 2, 0, 0, 5, 5, 5]]
    assert labels.tolist() == [[-100] * 9 + [1, 4, 2]]
    plain = SelectiveCopyConfig(vocab_size=6, seq_len=12, num_data_tokens=3, selective=False)
    inputs, labels = plain.sample(4, seed=0)
    assert torch.equal(inputs[:, :3], labels[:, 9:]) and (inputs[:, 3:9] == 0).all()


def test_selective_copy_defaults_are_the_papers():
    cfg = SelectiveCopyConfig()
    assert (cfg.vocab_size, cfg.num_data_tokens) == (16, 16)
    inputs, labels = cfg.sample(256, seed=0)
    data = labels[labels != IGNORE_INDEX]
    assert set(data.unique().tolist()) == set(range(1, 15))  # 14 data tokens
    assert torch.equal(cfg.sample(4, seed=2)[0], cfg.sample(4, seed=2)[0])
    assert not torch.equal(cfg.sample(4, seed=2)[0], cfg.sample(4, seed=3)[0])


def test_selective_copy_full_region():
    # A region exactly as long as the data: every region token is data.
    cfg = SelectiveCopyConfig(vocab_size=5, seq_len=8, num_data_tokens=4)
    inputs, labels = cfg.sample(16, seed=0)
    assert (inputs[:, :4] != 0).all() and torch.equal(inputs[:, :4], labels[:, 4:])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(vocab_size=2), "vocab_size=2"),
        (dict(seq_len=20, num_data_tokens=16), "seq_len=20"),
        (dict(num_data_tokens=0), "num_data_tokens"),
    ],
    ids=["vocab", "short", "no-data"],
)
def test_selective_copy_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        SelectiveCopyConfig(**kw)


# -------------------------------------------------------------------------------- registry


def test_task_registry():
    assert {"mqar", "selective_copy"} <= set(list_tasks())
    assert get_task_class("mqar") is MQARConfig
    task = build_task("selective_copy", seq_len=40, num_data_tokens=4)
    assert isinstance(task, SelectiveCopyConfig) and task.seq_len == 40
    assert task.to_dict()["task"] == "selective_copy"
    assert task.replace(seq_len=64).seq_len == 64
    with pytest.raises(ValueError, match="Did you mean 'mqar'"):
        build_task("mqr")
    with pytest.raises(ValueError, match="seq_len=4"):
        task.replace(seq_len=4)


def test_unknown_task_field_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"no field\(s\) 'num_pairs' \(did you mean 'num_kv_pairs'\?\).*seq_len"):
        build_task("mqar", num_pairs=3)


def test_a_new_task_in_one_file(tmp_path, monkeypatch):
    """A task is a module with a SyntheticTask dataclass; register_task (or an entry point)
    makes it a name for build_task, the presets and the synth command."""
    from mixerzoo.evals.synthetic import preset
    from mixerzoo.tasks import register_task, unregister_task

    (tmp_path / "my_task_mod.py").write_text(
        "from dataclasses import dataclass\n"
        "from typing import ClassVar\n"
        "import torch\n"
        "from mixerzoo.tasks import IGNORE_INDEX, SyntheticTask\n\n"
        "@dataclass(kw_only=True)\n"
        "class CopyFirst(SyntheticTask):\n"
        "    name: ClassVar[str] = 'copy_first'\n"
        "    vocab_size: int = 8\n"
        "    seq_len: int = 16\n\n"
        "    @classmethod\n"
        "    def preset_fields(cls, preset):\n"
        "        return {'seq_len': 12}, {}\n\n"
        "    def _generate(self, batch_size, generator, device):\n"
        "        x = torch.randint(0, self.vocab_size, (batch_size, self.seq_len), generator=generator, device=device)\n"
        "        y = torch.full_like(x, IGNORE_INDEX)\n"
        "        y[:, -1] = x[:, 0]\n"
        "        return x, y\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    register_task("copy_first", "my_task_mod:CopyFirst")
    try:
        assert "copy_first" in list_tasks()
        x, y = build_task("copy_first", vocab_size=5).sample(3, seed=0)
        assert x.shape == (3, 16) and torch.equal(y[:, -1], x[:, 0])
        cfg = preset("demo", "copy_first")
        assert cfg.task.name == "copy_first" and cfg.task.seq_len == 12
        with pytest.raises(ValueError, match="already registered"):
            register_task("copy_first", "my_task_mod:CopyFirst")
    finally:
        unregister_task("copy_first")
    assert "copy_first" not in list_tasks()
    with pytest.raises(TypeError, match="SyntheticTask"):
        register_task("not_a_task", dict)
    with pytest.raises(ValueError, match="module:Class"):
        register_task("bad_path", "no_colon_here")
