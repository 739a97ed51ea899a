"""The structured OBS local pruner on synthetic layers: its objective, its closed forms, nesting and GQA consistency."""

import pytest
import torch

from tyr.compressor.local_pruner import damped, prune_columns_progressively, prune_heads_gqa
from tyr.models.facts import gqa_attention_params, gqa_widths

F64 = torch.float64


def correlated_inputs(rows: int, width: int, seed: int) -> torch.Tensor:
    """Calibration inputs with correlated features and very different feature scales (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(width) + 0.4 * torch.randn(width, width, generator=g) / width ** 0.5
    scales = torch.exp(torch.randn(width, generator=g))
    return ((torch.randn(rows, width, generator=g) @ mixing) * scales).to(F64)


def layer(out: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(out, width, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) / width ** 0.5


def output_error(X: torch.Tensor, W: torch.Tensor, keep: list[int], W_kept: torch.Tensor) -> float:
    return ((X @ W.T - X[:, keep] @ W_kept.T) ** 2).sum().item()


def least_squares(X: torch.Tensor, W: torch.Tensor, keep: list[int], damp: float) -> torch.Tensor:
    """Closed form: W_keptᵀ = (H + λI)_kk⁻¹ ((H + λI) Wᵀ)_k, by a direct solve: the minimiser of
    ||X Wᵀ − X_k W_keptᵀ||² + λ ||W_kept − W_k||²."""
    H = X.T @ X
    Hd = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=F64)
    return torch.linalg.solve(Hd[keep][:, keep], (Hd @ W.T)[keep]).T


@pytest.fixture(scope="module")
def ffn_case():
    X, W = correlated_inputs(2000, 96, seed=0), layer(40, 96, seed=0)
    counts = [96, 84, 72, 60, 48, 36, 24, 12, 0]
    results = prune_columns_progressively(W, X.T @ X, group_size=4, keep_counts=counts, damp=0.01, dtype=F64)
    return X, W, counts, results


def test_keep_counts_exact_nested_and_dense_untouched(ffn_case):
    X, W, counts, results = ffn_case
    assert [len(r.keep) for r in results] == counts
    for wider, narrower in zip(results, results[1:]):
        assert set(narrower.keep) <= set(wider.keep)
        assert narrower.keep == sorted(narrower.keep)
    assert torch.equal(results[0].weight, W) and results[0].error == 0.0
    assert results[-1].weight.shape == (40, 0)
    # A keep count that is not a multiple of the step is still hit exactly.
    odd = prune_columns_progressively(W, X.T @ X, group_size=16, keep_counts=[77, 5], dtype=F64)
    assert [len(r.keep) for r in odd] == [77, 5]


def test_error_is_the_output_reconstruction_error_and_rises_along_the_ladder(ffn_case):
    X, W, counts, results = ffn_case
    errors = [output_error(X, W, r.keep, r.weight.to(F64)) for r in results]
    for reported, measured in zip([r.error for r in results], errors):
        assert reported == pytest.approx(measured, rel=1e-6, abs=1e-9)
    assert all(a <= b for a, b in zip(errors, errors[1:]))
    assert errors[-1] == pytest.approx(((X @ W.T) ** 2).sum().item())


def test_obs_beats_dropping_the_same_columns_and_magnitude_with_refit(ffn_case):
    X, W, counts, results = ffn_case
    magnitude_order = W.norm(dim=0).argsort(descending=True).tolist()
    for k, r in zip(counts[1:-1], results[1:-1]):
        dropped = output_error(X, W, r.keep, W[:, r.keep])
        by_magnitude = sorted(magnitude_order[:k])
        magnitude_refit = output_error(X, W, by_magnitude, least_squares(X, W, by_magnitude, 0.01))
        assert r.error < dropped
        assert r.error < magnitude_refit


def test_with_white_inputs_obs_is_magnitude_pruning():
    """H ∝ I: the OBS score ||w_j||²/[H⁻¹]_jj orders columns by norm, and the kept columns need no update."""
    rows, width = 512, 48
    Q, _ = torch.linalg.qr(torch.randn(rows, width, generator=torch.Generator().manual_seed(3), dtype=F64))
    X = Q * rows ** 0.5
    W = layer(20, width, seed=3)
    for k, r in zip([40, 24, 8], prune_columns_progressively(W, X.T @ X, 1, [40, 24, 8], dtype=F64)):
        by_magnitude = sorted(W.norm(dim=0).argsort(descending=True)[:k].tolist())
        assert r.keep == by_magnitude
        assert torch.allclose(r.weight, W[:, by_magnitude], rtol=1e-9, atol=1e-12)
        assert r.error == pytest.approx(output_error(X, W, by_magnitude, W[:, by_magnitude]), rel=1e-9)


def test_refit_is_the_closed_form_least_squares_solution(ffn_case):
    X, W, _, results = ffn_case
    for r in results[1:-1]:
        assert torch.allclose(r.weight.to(F64), least_squares(X, W, r.keep, 0.01), rtol=1e-8, atol=1e-10)


def test_obs_updates_without_refit_solve_the_damped_problem():
    """The OBS path's weights are the minimiser of (W'−W) H_damped (W'−W)ᵀ with the removed columns at zero."""
    X, W = correlated_inputs(1000, 64, seed=5), layer(16, 64, seed=5)
    H = X.T @ X
    Hd, _ = damped(H, 0.01)
    for r in prune_columns_progressively(W, H, 3, [50, 20], refit=False, dtype=F64):
        k = r.keep
        expected = torch.linalg.solve(Hd[k][:, k], (Hd @ W.T)[k]).T
        assert torch.allclose(r.weight, expected, rtol=1e-7, atol=1e-9)
        refit = prune_columns_progressively(W, H, 3, [len(k)], refit=True, dtype=F64)[0]
        assert refit.keep == k and torch.allclose(refit.weight, r.weight, rtol=1e-7, atol=1e-9)


def test_float32_solver_matches_float64():
    X, W = correlated_inputs(3000, 128, seed=7), layer(32, 128, seed=7)
    H = X.T @ X
    counts = [112, 64, 16]
    exact = prune_columns_progressively(W, H, 8, counts, dtype=F64)
    fast = prune_columns_progressively(W.float(), H.float(), 8, counts, dtype=torch.float32)
    for a, b in zip(exact, fast):
        assert a.keep == b.keep
        assert b.error == pytest.approx(a.error, rel=1e-3)


def test_gqa_widths_for_smollm2_geometry():
    """9 query heads in 3 KV groups: closest attention size to (1 − s) · dense, ties to the less pruned size."""
    expected = {0.0: [(3, 3)], 0.125: [(3, 3)], 0.25: [(3, 2)], 0.375: [(2, 3)], 0.5: [(2, 2), (3, 1)],
                0.625: [(1, 3), (2, 1)], 0.75: [(1, 2)], 0.875: [(1, 1)], 1.0: [(0, 0)]}
    for level, configs in expected.items():
        assert gqa_widths(9, 3, level) == configs
    assert gqa_attention_params(3, 3) == 24


@pytest.fixture(scope="module")
def head_case():
    head_dim, n_heads, n_kv = 8, 9, 3
    X, W = correlated_inputs(3000, n_heads * head_dim, seed=11), layer(48, n_heads * head_dim, seed=11)
    targets = [gqa_widths(n_heads, n_kv, i / 8) for i in range(9)]
    return X, W, head_dim, targets, prune_heads_gqa(W, X.T @ X, head_dim, n_kv, targets, dtype=F64)


def test_head_sets_are_gqa_consistent_and_hit_their_targets(head_case):
    X, W, head_dim, targets, results = head_case
    for request, r in zip(targets, results):
        groups = {}
        for h in r.keep:
            groups.setdefault(h // 3, []).append(h)
        sizes = {len(v) for v in groups.values()}
        assert len(sizes) <= 1
        config = (len(groups), sizes.pop() if sizes else 0)
        assert config in request
        assert r.weight.shape == (48, len(r.keep) * head_dim)
    assert torch.equal(results[0].weight, W)
    assert results[-1].keep == [] and results[-1].error == pytest.approx(((X @ W.T) ** 2).sum().item())


def test_head_pruning_error_and_refit(head_case):
    X, W, head_dim, _, results = head_case
    for r in results[2:-1]:
        cols = [h * head_dim + d for h in r.keep for d in range(head_dim)]
        measured = output_error(X, W, cols, r.weight.to(F64))
        assert r.error == pytest.approx(measured, rel=1e-6)
        assert torch.allclose(r.weight, least_squares(X, W, cols, 0.01), rtol=1e-8, atol=1e-10)
        assert measured < output_error(X, W, cols, W[:, cols])


def test_head_moves_pick_the_cheaper_structure():
    """A KV group whose heads carry nothing is dropped first; a head that carries nothing goes before its group."""
    head_dim, n_heads, n_kv = 4, 6, 3
    X = correlated_inputs(1500, n_heads * head_dim, seed=13)
    W = layer(16, n_heads * head_dim, seed=13)
    W[:, 2 * head_dim:4 * head_dim] *= 1e-4                       # group 1 (heads 2, 3) is nearly silent
    (two_groups,) = prune_heads_gqa(W, X.T @ X, head_dim, n_kv, [[(2, 2)]], dtype=F64)
    assert two_groups.keep == [0, 1, 4, 5]
    W = layer(16, n_heads * head_dim, seed=13)
    W[:, 5 * head_dim:6 * head_dim] *= 1e-4                       # head 5 is nearly silent
    (one_per_group,) = prune_heads_gqa(W, X.T @ X, head_dim, n_kv, [[(3, 1)]], dtype=F64)
    assert 5 not in one_per_group.keep and len(one_per_group.keep) == 3


def test_bad_requests_are_rejected():
    W, H = torch.randn(4, 12), torch.eye(12)
    with pytest.raises(ValueError, match="keep counts"):
        prune_columns_progressively(W, H, 2, [13])
    with pytest.raises(ValueError, match="not configurations"):
        prune_heads_gqa(W, H, 2, 3, [[(4, 1)]])
