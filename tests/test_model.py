import pytest
import torch

from slm_cli.errors import SlmError
from slm_cli.model import GPT, GPTConfig, padded_vocab_size
from slm_cli.model.hf import hf_state_dict


def small_config(**kw) -> GPTConfig:
    base = dict(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
    return GPTConfig(**(base | kw))


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(small_config()).eval()


def test_padded_vocab():
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(50304) == 50304
    assert padded_vocab_size(100) == 128
    assert padded_vocab_size(100, multiple=8) == 104
    cfg = small_config()
    assert cfg.vocab_size == 100 and cfg.padded_vocab == 128


def test_shapes_and_tied_weights(model: GPT):
    idx = torch.randint(0, 100, (3, 16))
    assert model(idx).shape == (3, 16, 32)
    assert model.logits(idx).shape == (3, 16, 128)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.shape == (128, 32)
    seen = {}
    assert model(idx, head=lambda h, w: seen.update(h=h, w=w) or "out") == "out"
    assert seen["w"] is model.lm_head.weight and seen["h"].shape == (3, 16, 32)


def test_logits_equal_hidden_times_head(model: GPT):
    idx = torch.randint(0, 100, (2, 10))
    h = model(idx)
    torch.testing.assert_close(model.logits(idx), h @ model.transformer.wte.weight.T)


def test_causal(model: GPT):
    idx = torch.randint(0, 100, (1, 16))
    changed = idx.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % 100
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_too_long_sequence_is_an_error(model: GPT):
    with pytest.raises(SlmError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bad_heads_is_an_error():
    with pytest.raises(SlmError, match="n_head"):
        small_config(n_embd=30, n_head=4)


def test_init_statistics():
    torch.manual_seed(0)
    m = GPT(small_config(n_layer=8, n_embd=128, n_head=4))
    assert abs(m.transformer.wte.weight.std().item() - 0.02) < 2e-3
    assert abs(m.transformer.wpe.weight.std().item() - 0.02) < 2e-3
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 2e-3
    assert abs(m.transformer.h[0].attn.c_proj.weight.std().item() - 0.02 / 4) < 5e-4  # 1/sqrt(2·8)
    assert m.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_gpt2_small_parameter_count():
    cfg = GPTConfig(vocab_size=50257)  # the GPT-2 small shape
    with torch.device("meta"):
        m = GPT(cfg)
    pad_rows = (cfg.padded_vocab - 50257) * 768
    # 124,439,808 is GPT-2 small (Hugging Face `gpt2`) with wpe and the unpadded vocabulary.
    assert m.num_params(exclude_position_embeddings=False) - pad_rows == 124_439_808
    assert m.num_params() == m.num_params(exclude_position_embeddings=False) - 1024 * 768


def test_param_groups(model: GPT):
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_params(False)
    assert any(p is model.lm_head.weight for p in decay["params"])
    assert any(p is model.transformer.wpe.weight for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])


def expected_hf_shapes(V: int, T: int, d: int) -> dict[str, tuple[int, ...]]:
    """GPT2LMHeadModel's state dict for one layer, written out by hand."""
    return {
        "transformer.wte.weight": (V, d),
        "transformer.wpe.weight": (T, d),
        "transformer.h.0.ln_1.weight": (d,),
        "transformer.h.0.ln_1.bias": (d,),
        "transformer.h.0.attn.c_attn.weight": (d, 3 * d),
        "transformer.h.0.attn.c_attn.bias": (3 * d,),
        "transformer.h.0.attn.c_proj.weight": (d, d),
        "transformer.h.0.attn.c_proj.bias": (d,),
        "transformer.h.0.ln_2.weight": (d,),
        "transformer.h.0.ln_2.bias": (d,),
        "transformer.h.0.mlp.c_fc.weight": (d, 4 * d),
        "transformer.h.0.mlp.c_fc.bias": (4 * d,),
        "transformer.h.0.mlp.c_proj.weight": (4 * d, d),
        "transformer.h.0.mlp.c_proj.bias": (d,),
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
        "lm_head.weight": (V, d),
    }


@pytest.mark.parametrize("bias", [True, False])
def test_hf_state_dict(bias: bool):
    torch.manual_seed(0)
    m = GPT(small_config(n_layer=1, bias=bias))
    sd = hf_state_dict(m)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_hf_shapes(100, 16, 32)
    fc = m.transformer.h[0].mlp.c_fc
    torch.testing.assert_close(sd["transformer.h.0.mlp.c_fc.weight"], fc.weight.T)
    torch.testing.assert_close(sd["lm_head.weight"], m.lm_head.weight[:100])
    if bias:
        torch.testing.assert_close(sd["transformer.h.0.mlp.c_fc.bias"], fc.bias)
    else:
        assert sd["transformer.h.0.mlp.c_fc.bias"].abs().max() == 0
    assert all(not v.requires_grad for v in sd.values())
