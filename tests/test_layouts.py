"""Model layouts: every supported family is described right, and passes that fold scales into
the op before a Linear keep each family's function."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from compress.errors import PassError
from compress.layouts import layout_of, rope_pairs, supported_families
from compress.quant.awq import AWQConfig, awq
from compress.registry import PassContext
from tests.conftest import FAMILIES, tiny_family_model


def test_every_family_of_the_tests_has_a_layout():
    assert set(FAMILIES) == set(supported_families())


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_names_real_modules_of_the_right_shape(family):
    model = tiny_family_model(family)
    layout = layout_of(model)
    modules = dict(model.named_modules())
    attention, mlp = layout.attention, layout.mlp
    assert layout.num_layers == 2 and layout.hidden_size == 64
    assert attention.num_heads == 4 and attention.num_kv_heads == 2 and attention.group_size == 2
    for index in range(layout.num_layers):
        o_proj = modules[layout.qualified(index, attention.o)]
        assert o_proj.in_features == attention.num_heads * attention.head_dim
        down = modules[layout.qualified(index, mlp.down)]
        assert down.in_features == mlp.intermediate_size
        readers = [modules[layout.qualified(index, name)] for name in attention.readers()]
        expected_rows = (attention.num_heads + 2 * attention.num_kv_heads) * attention.head_dim
        assert sum(m.out_features for m in readers) == expected_rows
        for name in layout.residual_readers():
            assert modules[layout.qualified(index, name)].weight.shape == (64,)
    assert modules[layout.embedding].weight.shape == (256, 64)
    assert modules[layout.lm_head].out_features == 256
    assert modules[layout.final_norm].weight.shape == (64,)
    assert (layout.norm_kind == "rms_one_plus") == family.startswith("gemma")
    assert (layout.embedding_scale is not None) == family.startswith("gemma")


def test_rope_pairs_follow_rotate_half():
    assert rope_pairs(8) == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_unknown_architectures_are_refused_with_the_known_families():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256)).eval()
    with pytest.raises(PassError, match=r"has no module 'self_attn\.q_proj'") as caught:
        layout_of(model)
    assert "gemma3_text" in (caught.value.hint or "")


def outlier_channels_(model, layout):
    """Make a few residual channels large (what AWQ's scales are for)."""
    with torch.no_grad():
        for index in range(layout.num_layers):
            for name in layout.residual_readers():
                norm = model.get_submodule(layout.qualified(index, name))
                norm.weight[[3, 17, 40]] += 4.0


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_folds_keep_every_family_s_logits(family):
    model = tiny_family_model(family)
    layout = layout_of(model)
    outlier_channels_(model, layout)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    report = awq(model, AWQConfig(bits=3, group_size=16), PassContext(calibration=calibration))
    with torch.no_grad():
        after = model(ids).logits
    assert report.metrics["scaled_groups"] > 0
    assert report.metrics["max_fold_error"] < 1e-4
    assert (after - before).norm() / before.norm() < 1e-4
    # grouped-query attention: the value->output group cannot be folded, and says so
    assert any("grouped-query" in reason for reason in report.skipped.values())
