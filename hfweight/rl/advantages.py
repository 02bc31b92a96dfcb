"""Pure functions of the gathered rewards: the advantages TRL forms (per reward, for the gradient Gram), NaN-robust
per-reward means (validation scores) and the per-domain signal a prompt-domain mixture learns from.

No trainer, no process group: every rank calls them on the same gathered tensors and gets the same result.
"""

from __future__ import annotations

import torch

from .config import MIXTURE_REWARD_SIGNALS


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation ignoring NaN, reduced over ``dim`` (TRL's ``nanstd``: Bessel-corrected)."""
    if dim is None:
        sq = (x - torch.nanmean(x)) ** 2
        return (torch.nansum(sq) / ((~torch.isnan(x)).sum() - 1)).sqrt()
    sq = (x - torch.nanmean(x, dim=dim, keepdim=True)) ** 2
    return (torch.nansum(sq, dim=dim) / ((~torch.isnan(x)).sum(dim=dim) - 1)).sqrt()


def combined_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reward TRL 1.16 trains on, per completion ``(N,)``: the ``weights``-weighted sum of the ``(N, K)`` rewards
    ignoring NaN, and NaN where every reward function returned None (``GRPOTrainer._generate_and_score_completions``,
    ``RLOOTrainer``'s likewise)."""
    combined = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(dim=1)
    combined[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return combined


def group_advantages(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    *,
    algorithm: str,
    aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
    normalize_advantages: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The advantages TRL 1.16 forms from ``(N, K)`` rewards and weights ``(K,)``, without any KL term.

    - ``algorithm="grpo"`` (``GRPOTrainer._generate_and_score_completions``): ``sum_then_normalize`` — weighted sum,
      minus the group mean, divided by the group (or batch) std + 1e-4 unless ``scale_rewards="none"``;
      ``normalize_then_sum`` (GDPO) — each reward z-scored within its group, weighted sum, standardized over the batch.
    - ``algorithm="rloo"`` (``RLOOTrainer``): weighted sum (clipped to ``reward_clip_range``), minus the leave-one-out
      mean of the scorable siblings; optionally standardized over the batch.

    Rows where every reward is NaN get advantage 0, as in TRL. With one-hot ``weights`` this gives the advantages of a
    single objective — what the gradient-based weighting of Lu et al. (2025) backpropagates per reward. A test checks
    that it reproduces TRL's own advantages.
    """
    w = weights.to(rewards_per_func.device, rewards_per_func.dtype)
    if algorithm == "grpo":
        if aggregation == "normalize_then_sum":
            return _gdpo_advantages(rewards_per_func, w, num_generations)
        if aggregation != "sum_then_normalize":
            raise ValueError(f"Unknown multi_objective_aggregation {aggregation!r}.")
        return _grpo_advantages(combined_rewards(rewards_per_func, w), num_generations, scale_rewards)
    if algorithm == "rloo":
        rewards = combined_rewards(rewards_per_func, w)
        return _rloo_advantages(rewards, num_generations, normalize_advantages, reward_clip_range)
    raise ValueError(f"Unknown algorithm {algorithm!r}; expected 'grpo' or 'rloo'.")


def _gdpo_advantages(rewards_per_func: torch.Tensor, w: torch.Tensor, num_generations: int) -> torch.Tensor:
    """GRPO's ``normalize_then_sum`` (GDPO): each reward z-scored within its group, weighted sum, standardized over the
    batch."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    k = rewards_per_func.shape[1]
    grouped = rewards_per_func.view(-1, num_generations, k)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = _nanstd(grouped, dim=1).unsqueeze(1) if num_generations > 1 else torch.zeros_like(mean_k)
    rewards = (((grouped - mean_k) / (std_k + 1e-4)).view(-1, k) * w).nansum(dim=1)
    rewards[unscorable] = torch.nan
    std = _nanstd(rewards) if rewards.numel() > 1 else torch.zeros(())
    return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std + 1e-4), nan=0.0)


def _grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """GRPO's ``sum_then_normalize``: the combined reward minus its group mean, over the group (or batch) std + 1e-4
    unless ``scale_rewards="none"``."""
    grouped = rewards.view(-1, num_generations)
    advantages = rewards - torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "group":
        advantages = advantages / (_nanstd(grouped, dim=1).repeat_interleave(num_generations) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (_nanstd(rewards).expand_as(rewards) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _rloo_advantages(
    rewards: torch.Tensor, num_generations: int, normalize: bool, clip_range: tuple[float, float] | None
) -> torch.Tensor:
    """RLOO: the combined reward (clipped to ``clip_range``) minus the leave-one-out mean of its group's scorable
    siblings; optionally standardized over the batch."""
    if clip_range:
        rewards = rewards.clamp(min=clip_range[0], max=clip_range[1])
    grouped = rewards.view(-1, num_generations)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    total = torch.nansum(grouped, dim=1, keepdim=True)
    advantages = rewards - ((total - grouped) / (scorable - 1)).view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def nan_robust_means(rewards: torch.Tensor) -> torch.Tensor:
    """Per-column mean over the finite entries of ``(N, K)`` rewards; NaN for a column with none."""
    finite = torch.isfinite(rewards)
    count = finite.sum(dim=0)
    total = torch.where(finite, rewards, torch.zeros_like(rewards)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def domain_reward_signal(
    combined: torch.Tensor, domains: torch.Tensor, num_generations: int, num_domains: int, signal: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain sums and counts of the mixture signal over the prompt groups of one generation batch.

    ``combined`` is the weighted reward per completion ``(N,)`` (NaN = unscorable), ``domains`` the domain index of
    each completion (constant within a group of ``num_generations``). Per group: ``learnability`` = population
    variance of the group's rewards (``p(1 − p)`` for 0/1 rewards: zero when the prompt is always or never solved),
    ``regret`` = ``1 − mean reward``. Groups without any scorable completion are skipped.
    """
    grouped = combined.view(-1, num_generations).double()
    group_domains = domains.view(-1, num_generations)[:, 0].long()
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1)
    mean = torch.where(valid, grouped, torch.zeros_like(grouped)).sum(dim=1) / count.clamp(min=1)
    if signal == "learnability":
        dev = torch.where(valid, grouped - mean.unsqueeze(1), torch.zeros_like(grouped))
        value = (dev**2).sum(dim=1) / count.clamp(min=1)
    elif signal == "regret":
        value = 1.0 - mean
    else:
        raise ValueError(f"Unknown mixture reward signal {signal!r}; expected one of {MIXTURE_REWARD_SIGNALS}.")
    keep = count > 0
    sums = torch.zeros(num_domains, dtype=torch.float64)
    counts = torch.zeros(num_domains, dtype=torch.float64)
    sums.index_add_(0, group_domains[keep].cpu(), value[keep].cpu())
    counts.index_add_(0, group_domains[keep].cpu(), torch.ones(int(keep.sum()), dtype=torch.float64))
    return sums, counts
