"""Selection strategies (random, eslm, ada_eslm), each checked against an independent reference:
exact fractions for the kept counts, brute-force sorts for top-k, a brute-force
Rockafellar–Uryasev minimisation for CVaR, dense float64 autograd for the gradient."""

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from slm_cli.errors import SlmError
from slm_cli.loss import TokenStats, token_stats, weighted_loss
from slm_cli.selection.eslm import ESLM, AdaESLM
from slm_cli.selection.random import Random
from tests.helpers import select_as_training

LN2 = math.log(2)


def stats_of(loss, entropy=None) -> TokenStats:
    loss = torch.as_tensor(loss, dtype=torch.float32)
    ent = None if entropy is None else torch.as_tensor(entropy, dtype=torch.float32)
    return TokenStats(loss=loss, lse=torch.zeros_like(loss), entropy=ent)


def ceil_keep(fraction: Fraction, m: int) -> int:
    """⌈fraction·m⌉ in exact arithmetic, `fraction` being the decimal the user writes."""
    return math.ceil(fraction * m)


def brute_top_k(scores: list[float], k: int) -> set[int]:
    return set(sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k])


def kept(mask: torch.Tensor) -> set[int]:
    return set(mask.nonzero().squeeze(1).tolist())


# ---- kept fraction ----------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 7, 10, 97, 1000, 4096])
@pytest.mark.parametrize("alpha", ["0.1", "0.25", "0.4", "0.5", "0.7", "0.9", "0.97"])
def test_kept_count_is_ceil_of_keep_fraction(m, alpha):
    keep = 1 - Fraction(alpha)
    loss = torch.rand(m, generator=torch.Generator().manual_seed(m))
    eslm = select_as_training(ESLM(alpha=float(alpha)), stats_of(loss), {})
    rand = select_as_training(Random(ratio=float(keep)), None, {"positions": torch.arange(m)})
    assert int(eslm.mask.sum()) == ceil_keep(keep, m)
    assert int(rand.mask.sum()) == ceil_keep(keep, m)
    assert eslm.mask.dtype == rand.mask.dtype == torch.bool and eslm.mask.shape == rand.mask.shape == (m,)


# ---- ESLM top-k --------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["loss", "entropy"])
@pytest.mark.parametrize("m,alpha", [(50, 0.6), (33, 0.5), (128, 0.9), (64, 0.3)])
def test_eslm_top_k_matches_brute_force_sort_with_ties(score, m, alpha):
    g = torch.Generator().manual_seed(m)
    loss = torch.randint(0, 5, (m,), generator=g).float()  # few distinct values: many ties
    entropy = torch.randint(0, 4, (m,), generator=g).float()
    strategy = ESLM(score=score, alpha=alpha)
    assert strategy.needs_entropy == (score == "entropy")
    out = select_as_training(strategy, stats_of(loss, entropy), {})
    scores = (loss if score == "loss" else entropy).tolist()
    k = int(out.mask.sum())
    assert kept(out.mask) == brute_top_k(scores, k)
    assert out.metrics["threshold"] == sorted(scores, reverse=True)[k - 1]
    assert out.metrics["alpha"] == alpha


def test_eslm_keeps_the_high_loss_tokens():
    g = torch.Generator().manual_seed(0)
    m, n_hard = 100, 30
    hard = torch.randperm(m, generator=g)[:n_hard]
    loss = torch.rand(m, generator=g)  # easy: loss in [0, 1)
    loss[hard] = 5 + 3 * torch.rand(n_hard, generator=g)  # hard: loss in [5, 8)
    is_hard = torch.zeros(m, dtype=torch.bool)
    is_hard[hard] = True
    roomy = select_as_training(ESLM(alpha=0.6), stats_of(loss), {}).mask  # k = 40 ≥ 30: every hard token fits
    assert roomy[is_hard].all() and int(roomy.sum()) == 40
    assert kept(roomy & ~is_hard) == brute_top_k(torch.where(is_hard, -1.0, loss).tolist(), 10)
    tight = select_as_training(ESLM(alpha=0.75), stats_of(loss), {}).mask  # k = 25 < 30: only hard tokens
    assert int(tight.sum()) == 25 and not (tight & ~is_hard).any()


# ---- CVaR identity -----------------------------------------------------------------------------
def ru_objective(losses: list[float], alpha: Fraction, tau: float) -> float:
    """Rockafellar–Uryasev: τ + 1/((1−α)M)·Σ(ℓ−τ)_+ in float64."""
    n = float((1 - alpha) * len(losses))
    return tau + sum(max(x - tau, 0.0) for x in losses) / n


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("m,alpha", [(40, "0.75"), (16, "0.5"), (64, "0.875"), (10, "0.3")])
def test_eslm_mean_loss_is_empirical_cvar_and_threshold_is_var(ties, m, alpha):
    a = Fraction(alpha)
    assert ((1 - a) * m).denominator == 1  # (1−α)M integral: the identity is exact
    g = torch.Generator().manual_seed(m)
    loss = torch.randint(0, 4, (m,), generator=g).float() if ties else 6 * torch.rand(m, generator=g)
    out = select_as_training(ESLM(alpha=float(a)), stats_of(loss), {})
    losses = loss.double().tolist()
    values = {tau: ru_objective(losses, a, tau) for tau in losses}
    cvar = min(values.values())  # the convex piecewise-linear minimum sits at a data point
    lo, hi = min(losses) - 1, max(losses) + 1
    grid = [lo + (hi - lo) * i / 4000 for i in range(4001)]
    assert min(ru_objective(losses, a, t) for t in grid) >= cvar - 1e-12
    assert loss.double()[out.mask].mean().item() == pytest.approx(cvar, rel=1e-12, abs=1e-12)
    # The threshold minimises the objective (it is a value-at-risk) and is the upper α-quantile
    # inf{s : #{ℓ ≤ s} > αM}; the lower one, inf{s : #{ℓ ≤ s} ≥ αM}, is the other end of the
    # minimisers' interval.
    threshold = out.metrics["threshold"]
    assert values[threshold] == pytest.approx(cvar, rel=1e-12, abs=1e-12)
    assert threshold == min(s for s in losses if sum(x <= s for x in losses) > a * m)
    var_lower = min(s for s in losses if sum(x <= s for x in losses) >= a * m)
    assert values[var_lower] == pytest.approx(cvar, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("m,alpha", [(37, "0.6"), (10, "0.35"), (99, "0.9")])
def test_eslm_threshold_is_var_when_alpha_m_is_not_integral(m, alpha):
    a = Fraction(alpha)
    assert (a * m).denominator != 1
    loss = torch.rand(m, generator=torch.Generator().manual_seed(m))
    out = select_as_training(ESLM(alpha=float(a)), stats_of(loss), {})
    losses = loss.tolist()
    var = min(s for s in losses if sum(x <= s for x in losses) >= a * m)  # docs/methods.md's VaR_α
    assert out.metrics["threshold"] == var
    assert kept(out.mask) == {j for j, x in enumerate(losses) if x >= var}


# ---- gradient of the selected loss --------------------------------------------------------------
@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("score", ["loss", "entropy"])
def test_eslm_weighted_loss_gradient_is_cross_entropy_on_selected_rows(score, keep_probs):
    g = torch.Generator().manual_seed(1)
    m, d, v = 29, 12, 40
    hidden = torch.randn(m, d, generator=g, dtype=torch.float64)
    weight = 0.5 * torch.randn(v, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (m,), generator=g)
    strategy = ESLM(score=score, alpha=0.6)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    stats = token_stats(h.detach(), w.detach(), labels, chunk_size=8, entropy=strategy.needs_entropy,
                        keep_probs=keep_probs)
    mask = select_as_training(strategy, stats, {}).mask
    value = weighted_loss(h, w, labels, mask.float() / mask.sum(), stats, chunk_size=8)
    value.backward()

    rows = mask.nonzero().squeeze(1)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy(h_ref[rows] @ w_ref.T, labels[rows])  # mean over the selected rows only
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    assert (h.grad[~mask] == 0).all()


# ---- Ada-ESLM -----------------------------------------------------------------------------------
def batch_with_easy_frac(easy: int, m: int, seed: int) -> TokenStats:
    """`easy` tokens with loss well below ln 2, the rest well above, in shuffled positions."""
    g = torch.Generator().manual_seed(seed)
    loss = 1.0 + 5 * torch.rand(m, generator=g)
    loss[torch.randperm(m, generator=g)[:easy]] = 0.5 * torch.rand(easy, generator=g)
    return stats_of(loss)


def test_ada_eslm_alpha_follows_the_rule_and_respects_bounds():
    m, momentum, lo, hi = 200, 0.3, 0.2, 0.9
    ada = AdaESLM(alpha=0.5, alpha_min=lo, alpha_max=hi, momentum=momentum)
    assert ada.easy_loss == pytest.approx(LN2)
    # Many easy tokens push α up to alpha_max, then none pull it down to alpha_min.
    easy_counts = [180, 200, 200, 200, 200, 100, 0, 0, 0, 0, 0, 0, 0, 60]
    expected = 0.5
    hit_hi = hit_lo = False
    for step, easy in enumerate(easy_counts):
        stats = batch_with_easy_frac(easy, m, step)
        out = select_as_training(ada, stats, {})
        # The selection uses α before the update: ⌈(1−α)M⌉ highest losses.
        assert out.metrics["alpha"] == pytest.approx(expected, rel=1e-12)
        # α is no short decimal here: round away float noise (1e-16) before the ceiling.
        k = math.ceil(round((1 - expected) * m, 6))
        assert kept(out.mask) == brute_top_k(stats.loss.tolist(), k)
        assert out.metrics["threshold"] == sorted(stats.loss.tolist(), reverse=True)[k - 1]
        assert out.metrics["easy_frac"] == easy / m
        expected = min(max((1 - momentum) * expected + momentum * easy / m, lo), hi)
        assert ada.alpha == pytest.approx(expected, rel=1e-12)
        assert lo <= ada.alpha <= hi
        hit_hi |= ada.alpha == hi
        hit_lo |= ada.alpha == lo
    assert hit_hi and hit_lo


def test_ada_eslm_default_moves_alpha_slowly_towards_easy_frac():
    ada = AdaESLM()
    assert (ada.alpha, ada.alpha_min, ada.alpha_max, ada.momentum) == (0.5, 0.2, 0.9, 0.05)
    expected = 0.5
    for step in range(5):
        select_as_training(ada, batch_with_easy_frac(140, 200, step), {})  # easy_frac 0.7 > α: α rises
        expected = 0.95 * expected + 0.05 * 0.7
        assert ada.alpha == pytest.approx(expected, rel=1e-12)
    assert 0.5 < ada.alpha < 0.7


def test_ada_eslm_state_dict_round_trip_gives_identical_selections():
    batches = [batch_with_easy_frac(e, 150, s) for s, e in enumerate([10, 140, 90, 30, 120, 150, 0, 75])]
    first = AdaESLM(momentum=0.2)
    for stats in batches[:4]:
        select_as_training(first, stats, {})
    state = copy.deepcopy(first.state_dict())
    assert set(state) == {"alpha"} and state["alpha"] == first.alpha
    resumed = AdaESLM(momentum=0.2)  # a fresh strategy, as on resume, then the checkpoint's state
    assert resumed.alpha != state["alpha"]
    resumed.load_state_dict(state)
    for stats in batches[4:]:
        a, b = select_as_training(first, stats, {}), select_as_training(resumed, stats, {})
        assert torch.equal(a.mask, b.mask) and a.metrics == b.metrics
    assert first.alpha == resumed.alpha


def test_ada_eslm_entropy_ranks_tokens_but_easy_frac_uses_loss():
    loss = torch.tensor([0.1, 0.2, 3.0, 4.0, 0.3, 2.0, 5.0, 0.4])
    entropy = torch.tensor([5.0, 4.0, 0.1, 0.2, 3.0, 0.3, 0.4, 2.0])
    ada = AdaESLM(score="entropy", alpha=0.5)
    assert ada.needs_entropy
    out = select_as_training(ada, stats_of(loss, entropy), {})
    assert kept(out.mask) == {0, 1, 4, 7}
    assert out.metrics["easy_frac"] == 0.5


# ---- Random -------------------------------------------------------------------------------------
def positions(seed: int, m: int) -> dict[str, torch.Tensor]:
    """A batch's stream positions: what Random draws from (windows at random offsets)."""
    return {"positions": torch.randperm(10 * m, generator=torch.Generator().manual_seed(seed))[:m]}


def test_random_is_uniform_over_positions():
    m, ratio, draws = 50, 0.3, 2000
    strategy = Random(ratio=ratio)
    counts = torch.zeros(m)
    for draw in range(draws):
        mask = select_as_training(strategy, None, positions(draw, m)).mask
        assert int(mask.sum()) == 15
        counts += mask
    freq = counts / draws
    sigma = math.sqrt(ratio * (1 - ratio) / draws)  # ≈ 0.01 per position
    assert (freq - ratio).abs().max() < 6 * sigma
    assert freq.mean().item() == pytest.approx(ratio)


def test_random_is_a_function_of_the_positions_alone():
    """The same tokens give the same subset whatever torch's RNG holds (so resume needs no state);
    other tokens (another device's, another micro-batch's under selection_scope=micro_batch) another subset."""
    strategy = Random(ratio=0.6)
    torch.manual_seed(1)
    a = select_as_training(strategy, None, positions(7, 100)).mask
    torch.manual_seed(2)
    torch.rand(5)
    assert torch.equal(select_as_training(strategy, None, positions(7, 100)).mask, a)
    rank1 = select_as_training(strategy, None, {"positions": positions(7, 100)["positions"] + 1}).mask
    assert not torch.equal(rank1, a)


def test_non_finite_scores_are_a_one_line_error():
    loss = torch.rand(20)
    loss[3] = float("nan")
    one_line_error(lambda: select_as_training(ESLM(alpha=0.5), stats_of(loss), {}), "1 of 20 selection scores are NaN")
    loss[3] = float("inf")
    one_line_error(lambda: select_as_training(ESLM(alpha=0.5), stats_of(loss), {}), "NaN or infinite")


# ---- bad input ----------------------------------------------------------------------------------
def one_line_error(make, match: str) -> None:
    with pytest.raises(SlmError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "x", True, None])
def test_fractions_outside_open_unit_interval_are_one_line_errors(bad):
    one_line_error(lambda: ESLM(alpha=bad), rf"selection\.alpha={bad} must be in \(0, 1\)")
    one_line_error(lambda: AdaESLM(alpha=bad), rf"selection\.alpha={bad} must be in \(0, 1\)")
    one_line_error(lambda: Random(ratio=bad), rf"selection\.ratio={bad} must be in \(0, 1\)")
    for key in ("alpha_min", "alpha_max", "momentum"):
        one_line_error(lambda key=key: AdaESLM(**{key: bad}), rf"selection\.{key}={bad} must be in \(0, 1\)")


@pytest.mark.parametrize("cls", [ESLM, AdaESLM])
def test_unknown_score_is_a_one_line_error(cls):
    one_line_error(lambda: cls(score="perplexity"), r"selection\.score=perplexity is not known: use one of loss, entropy")


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": 0.95}, r"selection\.alpha=0\.95 must lie in \[selection\.alpha_min, selection\.alpha_max\]"),
    ({"alpha_min": 0.6, "alpha_max": 0.4}, r"selection\.alpha=0\.5 must lie in"),
    ({"easy_loss": 0}, r"selection\.easy_loss=0 must be a positive loss"),
    ({"easy_loss": -1.0}, r"selection\.easy_loss=-1\.0 must be a positive loss"),
    ({"easy_loss": "x"}, r"selection\.easy_loss=x must be a positive loss"),
    ({"easy_loss": float("inf")}, r"selection\.easy_loss=inf must be a positive loss"),
])
def test_ada_eslm_bad_bounds_and_easy_loss_are_one_line_errors(kwargs, match):
    one_line_error(lambda: AdaESLM(**kwargs), match)
