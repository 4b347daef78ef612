"""Independent NumPy references for the advantage formulas (DESIGN §1), element by element."""

import numpy as np


def np_grpo(rewards, scale_rewards=True):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for b, group in enumerate(rewards):
        g = len(group)
        mean = sum(group) / g
        for i, r in enumerate(group):
            out[b, i] = r - mean
        if scale_rewards:
            std = np.sqrt(sum((r - mean) ** 2 for r in group) / (g - 1))
            out[b] /= std + 1e-4
    return out


def np_rloo(rewards):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for b, group in enumerate(rewards):
        for i, r in enumerate(group):
            others = [group[j] for j in range(len(group)) if j != i]
            out[b, i] = r - sum(others) / len(others)
    return out


def np_aapo(rewards, ref_rewards, scale_rewards=False, margin_low=0.2, margin_high=0.28):
    rewards = np.asarray(rewards, np.float64)
    ref_rewards = np.asarray(ref_rewards, np.float64)
    out = np_grpo(rewards, scale_rewards)
    for b in range(rewards.shape[0]):
        for i in range(rewards.shape[1]):
            out[b, i] += min(max(rewards[b, i] - ref_rewards[b, i], -margin_low), margin_high)
    return out


def np_margin_stats(rewards, ref_rewards, margin_low=0.2, margin_high=0.28):
    diff = np.asarray(rewards, np.float64) - np.asarray(ref_rewards, np.float64)
    margin = np.clip(diff, -margin_low, margin_high)
    return {
        "margin_mean": margin.mean(),
        "margin_clip_low_frac": (diff < -margin_low).mean(),
        "margin_clip_high_frac": (diff > margin_high).mean(),
        "margin_nonzero_frac": (margin != 0).mean(),
    }
