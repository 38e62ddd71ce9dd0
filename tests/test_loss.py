import pytest
import torch
import torch.nn.functional as F

from slm_cli.loss import SparseTargets, Workspace, _exp_rows, token_stats, weighted_loss

M, D, V = 37, 16, 50  # M is prime so no chunk size below divides it


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(M, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.5
    labels = torch.randint(0, V, (M,), generator=g)
    return hidden, weight, labels


def ours(hidden, weight, labels, weights, *, targets=None, keep_probs=True, chunk_size=8):
    """Value and grads from token_stats + weighted_loss."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    stats = token_stats(h, w, labels, chunk_size=chunk_size, keep_probs=keep_probs)
    value = weighted_loss(h, w, labels, weights, stats, targets=targets, chunk_size=chunk_size)
    value.backward()
    return value.detach(), h.grad, w.grad


def reference(hidden, weight, y, weights):
    """Dense float64 autograd: Σ_j w_j·(−Σ_v y_jv log p_jv)."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logp = torch.log_softmax(h @ w.T, dim=-1)
    value = (weights.double() * -(y.double() * logp).sum(-1)).sum()
    value.backward()
    return value.detach(), h.grad, w.grad


def assert_close(a, b):
    for x, r in zip(a, b, strict=True):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 8, 10, 1000])
def test_token_stats_match_dense_float64(data, chunk_size):
    hidden, weight, labels = data
    stats = token_stats(hidden, weight, labels, chunk_size=chunk_size, entropy=True)
    logits = hidden.double() @ weight.double().T
    logp = torch.log_softmax(logits, -1)
    kw = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.loss.double(), -logp.gather(1, labels[:, None]).squeeze(1), **kw)
    torch.testing.assert_close(stats.lse.double(), torch.logsumexp(logits, -1), **kw)
    torch.testing.assert_close(stats.entropy.double(), -(logp.exp() * logp).sum(-1), **kw)
    torch.testing.assert_close(stats.log_probs.double(), logp, **kw)
    assert stats.loss.dtype == stats.lse.dtype == stats.log_probs.dtype == torch.float32
    assert not stats.loss.requires_grad


def test_token_stats_optional_outputs(data):
    stats = token_stats(*data, keep_probs=False)
    assert stats.log_probs is None and stats.entropy is None


@pytest.mark.parametrize("keep_probs", [True, False])
def test_clm_equals_cross_entropy_mean(data, keep_probs):
    hidden, weight, labels = data
    got = ours(hidden, weight, labels, torch.full((M,), 1 / M), keep_probs=keep_probs)
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    value = F.cross_entropy(h @ w.T, labels)
    value.backward()
    assert_close(got, (value.detach(), h.grad, w.grad))


@pytest.mark.parametrize("keep_probs", [True, False])
def test_selected_subset_equals_cross_entropy_on_those_rows(data, keep_probs):
    hidden, weight, labels = data
    selected = torch.randperm(M, generator=torch.Generator().manual_seed(1))[:15]
    weights = torch.zeros(M)
    weights[selected] = 1 / len(selected)
    got = ours(hidden, weight, labels, weights, keep_probs=keep_probs)

    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    value = F.cross_entropy(h[selected] @ w.T, labels[selected])  # only the selected rows exist
    value.backward()
    assert_close(got, (value.detach(), h.grad, w.grad))
    unselected = torch.ones(M, dtype=torch.bool)
    unselected[selected] = False
    assert got[1][unselected].abs().max() == 0


@pytest.mark.parametrize("keep_probs", [True, False])
def test_arbitrary_weights(data, keep_probs):
    hidden, weight, labels = data
    weights = torch.rand(M, generator=torch.Generator().manual_seed(2))
    weights[::3] = 0
    got = ours(hidden, weight, labels, weights, keep_probs=keep_probs)
    assert_close(got, reference(hidden, weight, F.one_hot(labels, V), weights))


@pytest.mark.parametrize("keep_probs", [True, False])
def test_sparse_soft_targets_with_duplicates(data, keep_probs):
    hidden, weight, labels = data
    g = torch.Generator().manual_seed(3)
    K = 4
    ids = torch.randint(0, V, (M, K), generator=g)
    ids[:, 0] = labels
    ids[:5, 1] = ids[:5, 0]  # duplicates must add up
    probs = torch.rand(M, K, generator=g)
    probs[:, -1] = 0  # zero-probability entries are ignored
    probs[10:] /= probs[10:].sum(-1, keepdim=True)  # most rows sum to 1, the first ten need not
    weights = torch.rand(M, generator=g)
    weights[::4] = 0
    dense = torch.zeros(M, V, dtype=torch.float64).scatter_add_(1, ids, probs.double())
    got = ours(hidden, weight, labels, weights, targets=SparseTargets(ids, probs), keep_probs=keep_probs)
    assert_close(got, reference(hidden, weight, dense, weights))


def test_one_hot_sparse_targets_equal_labels(data):
    hidden, weight, labels = data
    weights = torch.full((M,), 1 / M)
    onehot = SparseTargets(labels[:, None], torch.ones(M, 1))
    for a, b in zip(
        ours(hidden, weight, labels, weights, targets=onehot),
        ours(hidden, weight, labels, weights),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_keep_probs_modes_agree(data):
    hidden, weight, labels = data
    weights = torch.rand(M, generator=torch.Generator().manual_seed(4))
    for a, b in zip(
        ours(hidden, weight, labels, weights, keep_probs=True),
        ours(hidden, weight, labels, weights, keep_probs=False),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_zero_weights_give_zero_loss_and_grads(data):
    value, gh, gw = ours(*data, torch.zeros(M))
    assert value == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_grad_only_for_hidden(data):
    hidden, weight, labels = data
    h = hidden.clone().requires_grad_()
    stats = token_stats(h, weight, labels)
    weighted_loss(h, weight, labels, torch.full((M,), 1 / M), stats).backward()
    assert h.grad is not None and weight.grad is None


def test_bfloat16_hidden(data):
    hidden, weight, labels = data
    weights = torch.rand(M, generator=torch.Generator().manual_seed(5))
    h = hidden.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()  # float32 head with bf16 activations: grads keep each dtype
    stats = token_stats(h, w, labels)
    value = weighted_loss(h, w, labels, weights, stats)
    value.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = reference(hidden.bfloat16().float(), weight, F.one_hot(labels, V), weights)
    for x, r in zip((value.detach(), h.grad, w.grad), ref, strict=True):
        torch.testing.assert_close(x.double(), r, rtol=0.05, atol=0.05 * r.abs().max().item())


def test_autocast_bfloat16(data):
    hidden, weight, labels = data
    weights = torch.full((M,), 1 / M)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = token_stats(h, w, labels)
        value = weighted_loss(h, w, labels, weights, stats)
    value.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    ref = reference(hidden, weight, F.one_hot(labels, V), weights)
    for x, r in zip((value.detach(), h.grad, w.grad), ref, strict=True):
        torch.testing.assert_close(x.double(), r, rtol=0.05, atol=0.05 * r.abs().max().item())


@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("soft", [False, True])
def test_autocast_bfloat16_with_a_selection(data, keep_probs, soft):
    """The GPU path on a CPU: bf16 autocast through the custom head backward with a selection (the
    gathered-rows path) and with sparse soft targets, against the float32 dense reference. Stated
    tolerance: 5% of the largest entry (bf16 has an 8-bit mantissa)."""
    hidden, weight, labels = data
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(M, generator=g) < 0.4
    weights = mask.float() / mask.sum()
    if soft:
        ids = torch.randint(0, V, (M, 3), generator=g)
        probs = torch.rand(M, 3, generator=g) / 3
        targets = SparseTargets(ids=torch.cat([labels[:, None], ids], 1), probs=torch.cat([1 - probs.sum(1, True), probs], 1))
        y = torch.zeros(M, V, dtype=torch.float64).scatter_add_(1, targets.ids, targets.probs.double())
    else:
        targets, y = None, F.one_hot(labels, V)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = token_stats(h, w, labels, keep_probs=keep_probs, chunk_size=7)
        value = weighted_loss(h, w, labels, weights, stats, targets=targets, chunk_size=7)
    value.backward()
    ref = reference(hidden, weight, y, weights)
    for x, r in zip((value.detach(), h.grad, w.grad), ref, strict=True):
        torch.testing.assert_close(x.double(), r, rtol=0.05, atol=0.05 * r.abs().max().item())


# ---- the workspace and the kept rows' softmax -----------------------------------------------------
def test_workspace_reuses_cpu_buffers_and_grows():
    ws = Workspace()
    a = ws.block("log_probs", 4, 10, torch.device("cpu"))
    b = ws.block("log_probs", 3, 10, torch.device("cpu"))  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and b.shape == (3, 10) and b.is_contiguous()
    c = ws.block("kept", 3, 10, torch.device("cpu"))  # another name: other memory
    assert c.data_ptr() != a.data_ptr()
    d = ws.block("log_probs", 8, 10, torch.device("cpu"))  # larger: a new buffer
    assert d.shape == (8, 10) and d.untyped_storage().nbytes() == 8 * 10 * 4


@pytest.mark.parametrize("rows", [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # every row: one run
    [3],  # one row
    [0, 2, 4, 6, 8],  # runs of one
    [1, 2, 3, 7, 8, 9],  # two runs, neither at the start
])
def test_exp_rows_equals_gather_then_exp(rows):
    log_probs = torch.log_softmax(torch.randn(10, 33, generator=torch.Generator().manual_seed(4)), -1)
    r = torch.tensor(rows)
    out = torch.full((len(rows), 33), float("nan"))
    got = _exp_rows(log_probs, r, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, log_probs[r].exp(), rtol=1e-6, atol=0)


def test_a_shared_workspace_changes_no_result(data):
    """The training step reuses one workspace across micro-batches and steps: every call must give
    what a fresh call gives, whatever the previous call left in the buffers (a larger batch, a
    selection, recompute mode)."""
    hidden, weight, labels = data
    ws = Workspace()
    sel = torch.zeros(M)
    sel[::2] = 1 / len(range(0, M, 2))
    calls = [(M, sel, True), (M, torch.full((M,), 1 / M), True), (20, torch.full((20,), 1 / 20), True),
             (M, sel, False), (20, sel[:20] * 2, True)]
    for n, weights, keep_probs in calls:
        fresh = ours(hidden[:n], weight, labels[:n], weights, keep_probs=keep_probs)
        h, w = hidden[:n].clone().requires_grad_(), weight.clone().requires_grad_()
        stats = token_stats(h, w, labels[:n], chunk_size=8, keep_probs=keep_probs, entropy=True, workspace=ws)
        value = weighted_loss(h, w, labels[:n], weights, stats, chunk_size=8, workspace=ws)
        value.backward()
        for x, y in zip((value.detach(), h.grad, w.grad), fresh, strict=True):
            assert torch.equal(x, y)
