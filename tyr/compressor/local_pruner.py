"""Structured OBS pruning of a linear layer's input columns (FFN channels) or input column blocks (attention heads).

Setting (ZipLM / SlimGPT): a linear layer y = x Wᵀ with W [out, in], calibration inputs X [rows, in] and the
Hessian H = XᵀX (damped: H + λI, λ = damp · mean(diag H)). Removing the column set S from W and re-tuning the rest
optimally costs

    error(S) = trace(W_S (H⁻¹_SS)⁻¹ W_Sᵀ)

and the optimal update of the remaining weights, and the inverse Hessian of the remaining columns, are

    W   -= W_S (H⁻¹_SS)⁻¹ H⁻¹_{S,:}
    H⁻¹ -= H⁻¹_{:,S} (H⁻¹_SS)⁻¹ H⁻¹_{S,:}      (the Schur complement: the inverse of H restricted to the rest).

Columns are removed progressively, a few at a time, cheapest first. After the path, the kept columns are refit
by least squares against the dense output with the damped Hessian on both sides, G = (H + λI)Wᵀ and
W_keptᵀ = (H + λI)_kk⁻¹ G_k: the minimiser of ||X Wᵀ − X_k W_keptᵀ||² + λ||W_kept − W_k||² (regularised towards the
dense weights; a ridge towards zero would crush the columns of small-scale inputs). In exact arithmetic this is
where the OBS updates end up; the refit removes the rounding the path accumulated.

Two entry points: ``prune_columns_progressively`` (FFN channels = input columns of down_proj; one nested
pass gives every ladder level) and ``prune_heads_gqa`` (query heads = input column blocks of o_proj, removed
in GQA-consistent moves). Everything here is a pure function of tensors. The solver precision is a parameter (float32 by default: fast on
every device; float64 for exactness checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrunedLinear:
    """One pruned version of a linear layer."""

    keep: list[int]         # kept units, sorted: input columns (column pruning) or query heads (head pruning)
    weight: torch.Tensor    # [out, kept columns], the updated weights of the kept columns (input dtype)
    error: float            # ||X Wᵀ − X_k weightᵀ||², the output reconstruction error on the calibration rows
    obs_error: float        # the OBS objective summed along the removal path (damped metric; 0 when nothing removed)
    energy: float           # ||X Wᵀ||², the dense output's energy (error / energy: the relative error)


def damped(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """H + λI with λ = damp · mean(diag H) (λ = damp when H is all zero, so the result is always invertible)."""
    mean_diag = H.diagonal().mean().item()
    lam = damp * mean_diag if mean_diag > 0 else damp
    return H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device), lam


def spd_inverse(H: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def removal_errors(W: torch.Tensor, Hinv: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """OBS error of removing each column set: ``sets`` [n_sets, set_size] (indices into W's columns) -> [n_sets]."""
    Hinv_SS = Hinv[sets[:, :, None], sets[:, None, :]]        # [n, s, s]
    W_S = W[:, sets].permute(1, 2, 0)                         # [n, s, out]
    return (W_S * (torch.linalg.inv(Hinv_SS) @ W_S)).sum(dim=(1, 2))


def obs_update_(W: torch.Tensor, Hinv: torch.Tensor, S: torch.Tensor) -> float:
    """Remove columns S optimally, in place: W's S columns and Hinv's S rows/columns become 0. Returns the error."""
    inv_SS = torch.linalg.inv(Hinv[S][:, S])                  # (H⁻¹_SS)⁻¹, a small [s, s] block
    W_S = W[:, S]
    Z = inv_SS @ W_S.T                                        # (H⁻¹_SS)⁻¹ W_Sᵀ   [s, out]
    error = (W_S.T * Z).sum().item()
    W.addmm_(Z.T, Hinv[S], alpha=-1)
    Hinv.addmm_(Hinv[:, S], inv_SS @ Hinv[S], alpha=-1)
    W[:, S] = 0                                               # exactly, not up to rounding
    Hinv[S, :] = 0
    Hinv[:, S] = 0
    return error


def obs_remove(W: torch.Tensor, Hinv: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Remove columns S optimally: (W of the remaining columns, their inverse Hessian, the OBS error)."""
    W, Hinv = W.clone(), Hinv.clone()
    error = obs_update_(W, Hinv, S)
    rest = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    rest[S] = False
    return W[:, rest], Hinv[rest][:, rest], error


def least_squares_refit(W: torch.Tensor, Hd: torch.Tensor, lam: float, WHt: torch.Tensor,
                        keep: torch.Tensor) -> torch.Tensor:
    """W_keptᵀ = (Hd)_kk⁻¹ G_k with Hd = H + λI and G = Hd Wᵀ = WHt + λWᵀ (WHt = H Wᵀ); returns W_kept [out, k]."""
    G_k = WHt[keep] + lam * W.T[keep]
    return torch.cholesky_solve(G_k, torch.linalg.cholesky(Hd[keep][:, keep])).T


def reconstruction_error(W: torch.Tensor, H: torch.Tensor, WHt: torch.Tensor, keep: torch.Tensor,
                         W_kept: torch.Tensor) -> float:
    """||X Wᵀ − X_k W_keptᵀ||² = tr(W H Wᵀ) − 2 tr(W_kept (H Wᵀ)_k) + tr(W_kept H_kk W_keptᵀ)."""
    if keep.numel() == 0:
        return (W * WHt.T).sum().item()
    cross = (W_kept * WHt[keep].T).sum()
    kept = (W_kept * (W_kept @ H[keep][:, keep])).sum()
    return ((W * WHt.T).sum() - 2 * cross + kept).item()


def refit_error(W: torch.Tensor, WHt: torch.Tensor, lam: float, keep: torch.Tensor, W_kept: torch.Tensor) -> float:
    """reconstruction_error for a refit W_kept, in O(out · k): from Hd_kk W_keptᵀ = G_k it follows that
    tr(W_kept H_kk W_keptᵀ) = tr(W_kept G_k) − λ||W_kept||², so the error is
    tr(W H Wᵀ) − tr(W_kept (H Wᵀ)_k) + λ⟨W_kept, W_k − W_kept⟩ (summed in float64: a difference of large terms)."""
    W, WHt, V = W.to(torch.float64), WHt.to(torch.float64), W_kept.to(torch.float64)
    return ((W * WHt.T).sum() - (V * WHt[keep].T).sum() + lam * (V * (W[:, keep] - V)).sum()).item()


def _finish(W0: torch.Tensor, H: torch.Tensor, Hd: torch.Tensor, lam: float, WHt: torch.Tensor,
            keep_cols: torch.Tensor, W_obs: torch.Tensor, refit: bool) -> tuple[torch.Tensor, float]:
    """The final weights of a kept column set (LS refit or OBS-updated) and their reconstruction error."""
    if keep_cols.numel() == W0.shape[1]:
        return W0, 0.0                                        # nothing removed: the dense weights, exactly
    W_kept = least_squares_refit(W0, Hd, lam, WHt, keep_cols) if refit and keep_cols.numel() else W_obs
    return W_kept, reconstruction_error(W0, H, WHt, keep_cols, W_kept)


def prune_columns_progressively(W: torch.Tensor, H: torch.Tensor, group_size: int, keep_counts: list[int],
                                damp: float = 0.01, refit: bool = True,
                                dtype: torch.dtype = torch.float32) -> list[PrunedLinear]:
    """Remove input columns of W [out, in] from all to none, ``group_size`` at a time, cheapest OBS error first.

    One pass yields every requested keep count as a snapshot, so the kept sets are nested; the counts are exactly
    the widths asked for (``tyr.models.facts.ffn_width`` gives them under the width rules: multiples of the
    tensor-parallel size times the FFN alignment), whatever ``group_size``. Each step removes the
    ``group_size`` columns with the smallest single-column OBS error ||w_j||² / [H⁻¹]_jj jointly (steps shrink
    to land exactly on every requested count). Returns one PrunedLinear per entry of ``keep_counts``, same order.
    ``dtype`` is the solver precision. At every snapshot H⁻¹ of the kept columns is recomputed from H, and with
    ``refit`` the weights are refit with it (W_keptᵀ = H⁻¹_kk G_k); the path goes on from there, so rounding in
    the downdates never builds up beyond one ladder step.
    """
    n_in = W.shape[1]
    if any(not 0 <= k <= n_in for k in keep_counts):
        raise ValueError(f"keep counts {keep_counts} must lie in [0, {n_in}]")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    W0, H = W.to(dtype), H.to(dtype)
    Hd, lam = damped(H, damp)
    WHt = H @ W0.T
    energy = (W0.to(torch.float64) * WHt.T.to(torch.float64)).sum().item()
    Hinv, W_cur = spd_inverse(Hd), W0.clone()
    alive = torch.arange(n_in, device=W.device)               # dense indices of W_cur's columns
    results: dict[int, PrunedLinear] = {}
    path_error = 0.0
    for target in sorted(set(keep_counts), reverse=True):
        # Between snapshots removed columns stay in place as zeros (cheaper than compacting every step).
        removed = torch.zeros(alive.numel(), dtype=torch.bool, device=W.device)
        while alive.numel() - int(removed.sum()) > target:
            step = min(group_size, alive.numel() - int(removed.sum()) - target)
            scores = (W_cur.pow(2).sum(0) / Hinv.diagonal()).masked_fill(removed, float("inf"))
            S = torch.sort(torch.topk(scores, step, largest=False).indices).values
            path_error += obs_update_(W_cur, Hinv, S)
            removed[S] = True
        W_cur, alive = W_cur[:, ~removed].contiguous(), alive[~removed]
        if alive.numel() == n_in:                              # nothing removed: the dense weights, exactly
            results[target] = PrunedLinear(alive.tolist(), W.clone(), 0.0, 0.0, energy)
            continue
        if alive.numel() == 0:
            results[target] = PrunedLinear([], W.new_zeros(W.shape[0], 0), energy, path_error, energy)
            continue
        Hinv = spd_inverse(Hd[alive][:, alive])                 # fresh H⁻¹ of the kept columns: no drift
        if refit:
            W_cur = ((WHt[alive] + lam * W0.T[alive]).T @ Hinv).contiguous()
            error = refit_error(W0, WHt, lam, alive, W_cur)
        else:
            error = reconstruction_error(W0, H, WHt, alive, W_cur)
        results[target] = PrunedLinear(alive.tolist(), W_cur.to(W.dtype), error, path_error, energy)
        W_cur = W_cur.clone()
    return [results[k] for k in keep_counts]


# ----- attention heads under GQA -----

def _head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Column indices of query heads (positions in the current W) [n] -> [n, head_dim]."""
    return heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)


class _HeadPaths:
    """Greedy GQA paths from dense; states and move scores are cached, so paths to several targets share work."""

    def __init__(self, W: torch.Tensor, Hinv: torch.Tensor, head_dim: int, n_kv_heads: int):
        self.head_dim, self.n_kv_heads = head_dim, n_kv_heads
        self.per_group = W.shape[1] // head_dim // n_kv_heads
        dense = tuple(range(n_kv_heads * self.per_group))
        self.states = {dense: (W, Hinv, 0.0)}     # kept heads -> (their OBS weights, inverse Hessian, path error)
        self.moves: dict[tuple, list] = {}

    def _columns(self, heads: tuple[int, ...], subset) -> torch.Tensor:
        position = {h: i for i, h in enumerate(heads)}
        local = torch.tensor(sorted(position[h] for h in subset), device=self.states[heads][0].device)
        return _head_columns(local, self.head_dim).flatten()

    def _scored_moves(self, heads: tuple[int, ...]) -> list[tuple[float, tuple[int, ...], str]]:
        """(OBS error, heads dropped, kind) of both move kinds from ``heads``."""
        if heads in self.moves:
            return self.moves[heads]
        W, Hinv, _ = self.states[heads]
        members = {}
        for h in heads:
            members.setdefault(h // self.per_group, []).append(h)
        members = list(members.values())
        moves = []
        if len(members[0]) > 1:  # drop each group's cheapest head, scored as one joint set
            singles = torch.stack([self._columns(heads, [h]) for m in members for h in m])
            single = removal_errors(W, Hinv, singles).view(len(members), -1)
            drop = tuple(m[j] for m, j in zip(members, single.argmin(1).tolist()))
            moves.append((removal_errors(W, Hinv, self._columns(heads, drop)[None]).item(), drop, "head"))
        if len(members) > 1:     # drop the cheapest whole KV group
            errors = removal_errors(W, Hinv, torch.stack([self._columns(heads, m) for m in members]))
            best = int(errors.argmin())
            moves.append((errors[best].item(), tuple(members[best]), "group"))
        self.moves[heads] = moves
        return moves

    def path(self, targets: list[tuple[int, int]]) -> tuple[list[int], torch.Tensor, float]:
        """Constrained greedy path to one of ``targets``: (kept heads, their OBS weights, path error).

        A move drops one query head from every kept group (each group's cheapest head, scored jointly) or one
        whole KV group (its remaining heads); only moves that keep some target reachable count; the cheapest wins.
        """
        heads = next(iter(self.states))
        g, r = self.n_kv_heads, self.per_group
        while (g, r) not in targets:
            allowed = []
            for error, drop, kind in self._scored_moves(heads):
                after = (g, r - 1) if kind == "head" else (g - 1, r)
                if any(tg <= after[0] and tr <= after[1] for tg, tr in targets):
                    allowed.append((error, drop, after))
            if not allowed:
                raise ValueError(f"no GQA move from ({g}, {r}) reaches any of {targets}")
            _, drop, (g, r) = min(allowed, key=lambda m: m[0])
            following = tuple(h for h in heads if h not in drop)
            if following not in self.states:
                W, Hinv, path_error = self.states[heads]
                W, Hinv, err = obs_remove(W, Hinv, self._columns(heads, drop))
                self.states[following] = (W, Hinv, path_error + err)
            heads = following
        W, _, path_error = self.states[heads]
        return list(heads), W, path_error


def prune_heads_gqa(W: torch.Tensor, H: torch.Tensor, head_dim: int, n_kv_heads: int,
                    targets: list[list[tuple[int, int]]], damp: float = 0.01, refit: bool = True,
                    dtype: torch.dtype = torch.float32) -> list[PrunedLinear]:
    """Prune the query heads (input column blocks of o_proj, W [hidden, heads·head_dim]) GQA-consistently.

    ``targets``: per request, the acceptable (kv groups, heads per group) configurations: those
    ``tyr.models.facts.gqa_widths`` allows under the width rules (a tensor-parallel size may exclude the dense
    configuration itself, so even the least pruned request can drop heads); [(0, 0)] means remove the attention.
    Each request follows the constrained greedy path from dense (paths share their common prefix). ``keep`` of each result lists the kept query heads: whole KV groups (head h belongs to
    group h // heads_per_group), the same number in each kept group.
    """
    n_heads = W.shape[1] // head_dim
    if W.shape[1] != n_heads * head_dim or n_heads % n_kv_heads:
        raise ValueError(f"o_proj input width {W.shape[1]} does not hold whole heads of {head_dim} in "
                         f"{n_kv_heads} KV groups")
    per_group = n_heads // n_kv_heads
    W0, H = W.to(dtype), H.to(dtype)
    Hd, lam = damped(H, damp)
    WHt = H @ W0.T
    energy = (W0.to(torch.float64) * WHt.T.to(torch.float64)).sum().item()
    paths = _HeadPaths(W0, spd_inverse(Hd), head_dim, n_kv_heads)
    done: dict[tuple, PrunedLinear] = {}
    for request in targets:
        key = tuple(sorted(request))
        if key in done:
            continue
        if not key or any(not (0 <= g <= n_kv_heads and 0 <= r <= per_group and (g == 0) == (r == 0)) for g, r in key):
            raise ValueError(f"GQA targets {list(key)} are not configurations of {n_kv_heads} groups x {per_group}")
        if (0, 0) in key:
            empty = W0.new_zeros(W0.shape[0], 0)
            done[key] = PrunedLinear(keep=[], weight=empty.to(W.dtype), error=energy,
                                     obs_error=(W0 * (W0 @ Hd)).sum().item(), energy=energy)
            continue
        heads, W_obs, obs_error = paths.path(list(key))
        cols = _head_columns(torch.tensor(heads, device=W.device), head_dim).flatten()
        W_kept, error = _finish(W0, H, Hd, lam, WHt, cols, W_obs, refit)
        done[key] = PrunedLinear(keep=heads, weight=W_kept.to(W.dtype), error=error, obs_error=obs_error,
                                 energy=energy)
    return [done[tuple(sorted(request))] for request in targets]
