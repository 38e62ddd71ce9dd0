import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from slm_cli.flops import (
    flops_per_token,
    head_flops_per_token,
    matmul_params,
    saved_frac,
    step_flops,
)
from slm_cli.loss import token_stats, weighted_loss
from slm_cli.model.gpt import GPT, GPTConfig


def counted_flops(run) -> int:
    """FLOPs FlopCounterMode sees while ``run()`` executes (math attention, which it can count)."""
    # CPU's fused attention kernel has no FlopCounterMode formula (it counts 0); the math path does.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def counted_step_flops(cfg: GPTConfig, B: int, selected: int, keep_probs: bool = True) -> int:
    """FLOPs that FlopCounterMode sees in one forward + backward of the training path."""
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (B, cfg.block_size))
    labels = torch.randint(0, cfg.vocab_size, (B * cfg.block_size,))
    weights = torch.zeros(B * cfg.block_size)
    weights[torch.randperm(len(weights))[:selected]] = 1 / selected

    def head(h, w):
        h = h.flatten(0, 1)
        stats = token_stats(h, w, labels, chunk_size=50, keep_probs=keep_probs)
        return weighted_loss(h, w, labels, weights, stats, chunk_size=50)

    return counted_flops(lambda: model(idx, head=head).backward())


def test_matmul_params_and_per_token():
    cfg = GPTConfig(vocab_size=50257)  # GPT-2 small
    with torch.device("meta"):
        m = GPT(cfg)
    biases_and_norms = sum(p.numel() for p in m.parameters() if p.dim() == 1)
    assert matmul_params(cfg) == m.num_params() - biases_and_norms  # num_params excludes wpe
    assert flops_per_token(cfg) == 6 * matmul_params(cfg) + 12 * 12 * 1024 * 768
    assert head_flops_per_token(cfg) == 2 * 768 * 50304


def test_clm_step_matches_flop_counter():
    cfg = GPTConfig(block_size=64, vocab_size=500, n_layer=2, n_head=4, n_embd=64)
    B = 2
    tokens = B * cfg.block_size
    counted = counted_step_flops(cfg, B, selected=tokens)
    assert counted == pytest.approx(tokens * flops_per_token(cfg), rel=0.1)
    assert step_flops(cfg, tokens, tokens).realized == tokens * flops_per_token(cfg)


@pytest.mark.parametrize("keep_probs", [True, False])
def test_selected_step_matches_realized(keep_probs):
    cfg = GPTConfig(block_size=32, vocab_size=8000, n_layer=1, n_head=2, n_embd=32)  # head dominates
    B, selected = 2, 20
    tokens = B * cfg.block_size
    counted = counted_step_flops(cfg, B, selected, keep_probs=keep_probs)
    flops = step_flops(cfg, tokens, selected, keep_probs=keep_probs)
    assert counted == pytest.approx(flops.realized, rel=0.1)
    assert counted < 0.8 * flops.clm  # the head backward really shrank


def test_accounting_identities():
    cfg = GPTConfig(block_size=128, vocab_size=1000, n_layer=2, n_head=2, n_embd=64)
    F, head = flops_per_token(cfg), head_flops_per_token(cfg)
    clm = step_flops(cfg, 100, 100)
    assert clm.nominal == clm.realized == clm.clm == 100 * F
    assert saved_frac(clm.nominal, clm.clm) == saved_frac(clm.realized, clm.clm) == 0
    assert step_flops(cfg, 100, 100, keep_probs=False).realized == 100 * F + 100 * head

    sel = step_flops(cfg, 100, 40, extra_forward=7.0)
    assert sel.nominal == pytest.approx(100 * F / 3 + 40 * 2 * F / 3 + 7)
    assert sel.realized == 100 * F - 60 * 2 * head + 7
    assert saved_frac(sel.nominal, sel.clm) == pytest.approx(0.6 * 2 / 3 - 7 / (100 * F))
    assert sel.nominal < sel.realized < sel.clm  # realized saves only the head's backward
    assert saved_frac(1.0, 0.0) == 0.0
