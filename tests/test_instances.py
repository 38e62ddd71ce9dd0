"""Instance-level selection (hierarchical ESLM) against a brute-force float64 reference: which windows
the early exit keeps, which tokens inside them, the loss and the gradient of the training step; and
the early exit's FLOPs against torch's FlopCounterMode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from slm_cli.flops import early_exit_flops_per_window
from slm_cli.model.gpt import GPT, GPTConfig
from slm_cli.module import SLMModule
from slm_cli.selection.base import keep_count
from slm_cli.selection.hier_eslm import HierESLM
from slm_cli.selection.instances import score_positions, window_features
from slm_cli.selection.scope import ONE_DEVICE
from tests.test_flops import counted_flops

CFG = GPTConfig(block_size=16, vocab_size=97, n_layer=3, n_head=2, n_embd=32)


def batch_of(rows: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (rows, CFG.block_size + 1), generator=g)
    positions = torch.arange(CFG.block_size)[None] + 1 + 100 * torch.arange(rows)[:, None]
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "positions": positions}


def logp64(model: GPT, ids: torch.Tensor, blocks: int) -> torch.Tensor:
    """(B, T, Vp) float64 log-probabilities after the first ``blocks`` blocks, ln_f and the tied head,
    written out layer by layer (no slm loss code)."""
    t = model.transformer
    x = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
    for block in t.h[:blocks]:
        x = block(x)
    return F.log_softmax(t.ln_f(x) @ model.lm_head.weight.T, dim=-1)


def brute_force(model32: GPT, batch: dict[str, torch.Tensor], strategy: HierESLM, positions: torch.Tensor):
    """The step by definition, in float64: window scores from the early exit at ``positions``, the
    top windows by a full sort (ties to the lower row), per-token CE of the kept windows through the
    whole model, the top tokens, the mean CE over them and its gradient."""
    model = copy.deepcopy(model32).double()
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        lp = logp64(model, ids, strategy.exit_layer)[:, positions]
        nll = -lp.gather(-1, labels[:, positions, None]).squeeze(-1)
        ent = -(lp.exp() * lp).sum(-1)
    scores = (nll if strategy.score == "loss" else ent).mean(1)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))
    windows = sorted(order[: keep_count(1 - strategy.window_alpha, len(scores))])
    lp = logp64(model, ids[windows], CFG.n_layer)
    nll = -lp.gather(-1, labels[windows, :, None]).squeeze(-1).reshape(-1)
    ent = -(lp.exp() * lp).sum(-1).reshape(-1)
    token_scores = (nll if strategy.score == "loss" else ent).detach()
    k = keep_count(1 - strategy.alpha, len(token_scores))
    tokens = sorted(sorted(range(len(token_scores)), key=lambda i: (-token_scores[i].item(), i))[:k])
    loss = nll[tokens].mean()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return windows, tokens, loss.item(), grads


@pytest.mark.parametrize("score", ["loss", "entropy"])
@pytest.mark.parametrize(("window_alpha", "alpha", "exit_layer", "count"), [(0.5, 0.4, 1, 5), (0.3, 0.6, 2, None)])
def test_training_step_matches_brute_force(score: str, window_alpha: float, alpha: float, exit_layer: int,
                                           count: int | None) -> None:
    torch.manual_seed(0)
    strategy = HierESLM(score=score, alpha=alpha, window_alpha=window_alpha, exit_layer=exit_layer,
                        score_positions=count)
    module = SLMModule(CFG, None, strategy, max_steps=1, chunk_size=7)
    module.manual_backward = lambda loss: loss.backward()  # the step outside a Trainer
    batch = batch_of(6, seed=1)
    positions = score_positions(CFG.block_size, count)
    windows, tokens, loss, grads = brute_force(module.model, batch, strategy, positions)

    kept = strategy.select_windows(window_features(module.model, batch, strategy, positions, chunk_size=7))
    assert kept.mask.nonzero().squeeze(1).tolist() == windows
    result = module.forward_backward(batch, 0, ONE_DEVICE)
    assert result.drawn == 6 * CFG.block_size and result.token_loss.numel() == len(windows) * CFG.block_size
    assert int(result.selected) == len(tokens)
    assert result.loss.item() == pytest.approx(loss, rel=1e-5)
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p.grad.double(), grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_score_positions_are_the_strata_centres() -> None:
    assert score_positions(16, 4).tolist() == [2, 6, 10, 14]
    assert score_positions(10, 3).tolist() == [1, 5, 8]
    assert score_positions(8, None).tolist() == list(range(8)) == score_positions(8, 64).tolist()


def test_early_exit_flops_match_the_flop_counter() -> None:
    """The early exit's matmuls as FlopCounterMode counts them (math attention) equal the formula:
    exit_layer blocks over every position and the head over the scored positions only."""
    cfg = GPTConfig(block_size=32, vocab_size=300, n_layer=4, n_head=2, n_embd=48)
    model = GPT(cfg)
    strategy = HierESLM(exit_layer=2, score_positions=8)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=g)
    positions = score_positions(cfg.block_size, 8)
    counted = counted_flops(lambda: window_features(model, {"input_ids": ids, "labels": ids}, strategy, positions,
                                                    chunk_size=64))
    assert counted == 3 * early_exit_flops_per_window(cfg, 2, 8)
