"""Model structure (keys, parameter counts from the spec), variants (VQ, L2, legacy decoder, groups, pre-norm)."""

import pytest
import torch
import torch.nn.functional as F

import maskbit
from maskbit.bits import combine_groups, index_to_signs, signs_to_index, split_groups
from maskbit.generator import Generator
from maskbit.tokenizer import Tokenizer


def _meta_model(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


def _params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, entries, params", [
    ("maskbit_tokenizer_12bit", 177, 54_479_247),
    ("vqgan_plus_12bit", 176, 55_007_683),
    ("vqgan_plus_10bit", 176, 55_990_915),
    ("maskbit_tokenizer_10bit", 177, 54_469_005),
    ("maskbit_tokenizer_18bit", 177, 54_509_973),
])
def test_tokenizer_state_dict_matches_spec(name, entries, params):
    model = _meta_model(Tokenizer, maskbit.get_preset(name).tokenizer)
    state = model.state_dict()
    assert len(state) == entries
    assert _params(model) == params
    if "12bit" in name and "maskbit" in name:
        assert _params(model.encoder) == 25_125_260 and _params(model.decoder) == 29_353_987
        assert state["quantize.bits_to_indices"].dtype == torch.int32
        assert state["encoder.down.2.res_blocks.0.nin_shortcut.weight"].shape == (256, 256, 1, 1)
        assert "encoder.down.4.down_conv.weight" not in state and "decoder.up.4.upsample_conv.weight" not in state
        assert "encoder.down.0.res_blocks.0.conv1.bias" not in state


def test_maskgit_legacy_decoder_layout():
    model = _meta_model(Tokenizer, maskbit.get_preset("maskgit_tokenizer").tokenizer)
    assert _params(model) == 54_515_587
    state = model.state_dict()
    assert "decoder.up.0.upsample_conv.weight" not in state          # legacy up.0 = final 128-ch stage
    assert state["decoder.up.4.upsample_conv.weight"].shape == (512, 512, 3, 3)


def test_legacy_decoder_computes_the_new_layout_with_reversed_keys():
    torch.manual_seed(0)
    legacy = maskbit.build_tokenizer("tiny_maskgit")
    cfg = maskbit.get_preset("tiny_maskgit").tokenizer
    from dataclasses import replace
    new = Tokenizer(replace(cfg, legacy_decoder=False)).eval()
    n = cfg.num_resolutions - 1
    remapped = {}
    for key, value in legacy.state_dict().items():
        if key.startswith("decoder.up."):
            k = int(key.split(".")[2])
            key = f"decoder.up.{n - k}." + key.split(".", 3)[3]
        remapped[key] = value
    new.load_state_dict(remapped)
    idx = torch.randint(0, cfg.codebook_size, (2, 8, 8))
    with torch.no_grad():
        assert torch.equal(legacy.decode_tokens(idx), new.decode_tokens(idx))


@pytest.mark.parametrize("name, entries, params", [
    ("maskbit_generator_14bit", 301, 304_929_024),
    ("maskbit_generator_10bit", 301, 304_728_128),
    ("maskbit_generator_18bit", 301, 305_720_320),
])
def test_generator_state_dict_matches_spec(name, entries, params):
    model = _meta_model(Generator, maskbit.get_preset(name).generator)
    state = model.state_dict()
    assert len(state) == entries and _params(model) == params
    assert list(state)[:3] == ["pos_emb", "bits_to_indices", "class_emb.weight"]
    assert state["transformer.layers.23.0.mha.in_proj_weight"].shape == (3072, 1024)
    assert "norm_after_transformer.weight" not in state


def test_prenorm_generator_has_final_norm():
    state = maskbit.build_generator("tiny_lfq8_prenorm").state_dict()
    assert "norm_after_transformer.weight" in state


def _reference_logits(gen, groups, labels, drop):
    """LFQBert written the official way: bitwise ops, nn.MultiheadAttention math, explicit label writes."""
    cfg = gen.config
    sd = gen.state_dict()
    E = cfg.bits_per_group
    bits = ((groups[..., None] & (2 ** torch.arange(E))) != 0).float() * 2 - 1
    bits[groups == cfg.mask_token] = 0.0
    x = F.linear(bits.flatten(2), sd["input_proj.weight"], sd["input_proj.bias"])
    labels = labels.clone()
    labels[drop] = cfg.num_classes
    x = torch.cat([x, F.embedding(labels, sd["class_emb.weight"])[:, None]], 1) + sd["pos_emb"]
    ln = lambda t, p: F.layer_norm(t, (cfg.hidden_dim,), sd[p + ".weight"], sd[p + ".bias"], 1e-12)
    x = ln(x, "first_layer.0")
    for i in range(cfg.depth):
        p = f"transformer.layers.{i}."
        def attn(t):
            out, _ = F.multi_head_attention_forward(
                t.transpose(0, 1), t.transpose(0, 1), t.transpose(0, 1), cfg.hidden_dim, cfg.heads,
                sd[p + "0.mha.in_proj_weight"], sd[p + "0.mha.in_proj_bias"], None, None, False, 0.0,
                sd[p + "0.mha.out_proj.weight"], sd[p + "0.mha.out_proj.bias"], training=False, need_weights=False)
            return out.transpose(0, 1)
        def ffn(t):
            h = F.gelu(F.linear(t, sd[p + "1.net.0.weight"], sd[p + "1.net.0.bias"]))
            return F.linear(h, sd[p + "1.net.2.weight"], sd[p + "1.net.2.bias"])
        if cfg.use_prenorm:
            x = x + attn(ln(x, p + "0.norm"))
            x = x + ffn(ln(x, p + "1.norm"))
        else:
            x = ln(x + attn(x), p + "0.norm")
            x = ln(x + ffn(x), p + "1.norm")
    if cfg.use_prenorm:
        x = ln(x, "norm_after_transformer")
    x = ln(F.gelu(F.linear(x, sd["last_layer.0.weight"], sd["last_layer.0.bias"])), "last_layer.2")
    logits = F.linear(x, sd["prediction_layer.weight"], sd["prediction_layer.bias"])
    return logits.view(*x.shape[:2], cfg.codebook_splits, -1)[:, :cfg.num_tokens]


@pytest.mark.parametrize("preset", ["tiny_lfq10", "tiny_lfq6_g1", "tiny_lfq9_g3", "tiny_lfq8_prenorm"])
def test_generator_variants_match_the_official_formulation(preset):
    torch.manual_seed(1)
    gen = maskbit.build_generator(preset)
    with torch.no_grad():
        for p in gen.parameters():     # perturb norms and biases so they matter
            p.add_(0.05 * torch.randn_like(p))
    cfg = gen.config
    groups = torch.randint(0, cfg.group_classes + 1, (3, cfg.num_tokens, cfg.codebook_splits))
    labels = torch.tensor([3, 999, 0])
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        ours = gen(groups, labels, drop)
        ref = _reference_logits(gen, groups, labels, drop)
    assert ours.shape == (3, cfg.num_tokens, cfg.codebook_splits, cfg.group_classes)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    with torch.no_grad():   # a dropped label is the class-token row num_classes
        same = gen(groups, torch.tensor([3, cfg.num_classes, 0]), torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(ours, same, atol=1e-6, rtol=0)


def test_vq_quantizer_picks_nearest_codes_with_and_without_l2():
    torch.manual_seed(2)
    for preset, l2 in (("tiny_vq", False), ("tiny_vq_l2", True)):
        tok = maskbit.build_tokenizer(preset)
        with torch.no_grad():
            tok.quantize.embedding.weight.normal_()
            z = torch.randn(2, 16, 8, 8)
            z_q, out = tok.quantize(z)
        vectors = z.permute(0, 2, 3, 1).reshape(-1, 16)
        codes = tok.quantize.embedding.weight
        if l2:
            vectors, codes = F.normalize(vectors, dim=-1), F.normalize(codes, dim=-1)
        expected = torch.cdist(vectors, codes).argmin(1).view(2, 8, 8)
        assert torch.equal(out.indices, expected)
        torch.testing.assert_close(z_q.permute(0, 2, 3, 1), codes[expected])
        assert out.codebook_loss is not None and out.quantizer_loss > 0
        if l2:
            assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)


def test_lfq_signs_bits_and_losses():
    tok = maskbit.build_tokenizer("tiny_lfq10")
    z = torch.tensor([0.5, -0.2, 0.0, 2.0, -1.0, 0.1, 0.0, -3.0, 0.3, 0.7]).view(1, 10, 1, 1)
    z_q, out = tok.quantize(z)
    expected_bits = [1, 0, 0, 1, 0, 1, 0, 0, 1, 1]      # exactly 0 maps to -1 (bit 0)
    assert out.indices.item() == sum(b << k for k, b in enumerate(expected_bits))
    assert torch.equal(z_q.flatten(), torch.tensor([2.0 * b - 1 for b in expected_bits]))
    assert out.commitment_loss.item() == pytest.approx(0.25 * torch.mean((z_q - z) ** 2).item())
    assert out.entropy_loss.item() == 0.0                 # only in training mode
    tok.train()
    _, out = tok.quantize(torch.randn(2, 10, 4, 4))
    assert out.entropy_loss.item() != 0.0
    assert out.quantizer_loss.item() == pytest.approx((out.commitment_loss + out.entropy_loss).item())
    assert torch.equal(tok.quantize.get_codebook_entry(torch.tensor([5])), index_to_signs(torch.tensor([5]), 10))


def test_bit_and_group_conversions_round_trip():
    idx = torch.randint(0, 2 ** 12, (4, 16))
    groups = split_groups(idx, 12, 3)
    assert groups.max() < 16 and torch.equal(groups[..., 0], idx % 16)      # group 0 = low bits
    assert torch.equal(combine_groups(groups, 12), idx)
    assert torch.equal(signs_to_index(index_to_signs(idx, 12)), idx)
    import numpy as np
    from maskbit_runtime import tokens
    assert np.array_equal(tokens.split_groups(idx.numpy(), 12, 3), groups.numpy())
    assert np.array_equal(tokens.combine_groups(groups.numpy(), 12), idx.numpy())
    assert np.array_equal(tokens.bits_to_index(tokens.index_to_bits(idx.numpy(), 12)), idx.numpy())
