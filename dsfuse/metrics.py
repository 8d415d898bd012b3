"""Metrics shared by the commands: image fidelity, classification quality, MoE routing."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dsfuse.nn.moe import RoutingRecord


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB; images [B, C, H, W] in [-1, 1] (range 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Gaussian window, Wang et al. 2004); [B, C, H, W]."""
    x, y = x.float(), y.float()
    coords = torch.arange(window, dtype=torch.float32, device=x.device) - window // 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def confusion_matrix(true: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes] counts; rows are true classes, columns predictions."""
    idx = true.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy(true: torch.Tensor, pred: torch.Tensor) -> float:
    return float((true == pred).float().mean()) if len(true) else 0.0


def per_class_f1(matrix: torch.Tensor) -> torch.Tensor:
    """F1 per class from a confusion matrix."""
    m = matrix.float()
    tp = m.diag()
    precision = tp / m.sum(0).clamp_min(1)
    recall = tp / m.sum(1).clamp_min(1)
    return 2 * precision * recall / (precision + recall).clamp_min(1e-12)


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of codes used, perplexity of the code distribution) over a set of token indices."""
    counts = torch.bincount(indices.flatten().long(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


# --------------------------------------------------------------------------- MoE routing

def max_violation(load: torch.Tensor) -> float:
    """MaxVio (DeepSeek-V3): max load / mean load - 1; 0 when perfectly even."""
    load = load.float()
    return float(load.max() / load.mean().clamp_min(1e-9) - 1)


def frequent_pairs(expert_ids: torch.Tensor, n_experts: int, top: int = 5) -> list[dict[str, Any]]:
    """The expert pairs most often chosen together for one token."""
    k = expert_ids.shape[1]
    if k < 2:
        return []
    first, second = torch.combinations(torch.arange(k, device=expert_ids.device), 2).T
    a, b = expert_ids[:, first], expert_ids[:, second]
    codes = (torch.minimum(a, b) * n_experts + torch.maximum(a, b)).flatten()
    counts = torch.bincount(codes, minlength=n_experts * n_experts)
    values, codes = counts.topk(min(top, int((counts > 0).sum())))
    return [{"experts": [int(c) // n_experts, int(c) % n_experts], "count": int(v)} for v, c in zip(values, codes)]


def routing_stats(record: RoutingRecord) -> dict[str, Any]:
    """Per-expert load, imbalance, drops, entropy, losses and frequent pairs of one layer's last forward."""
    n_tokens, n_experts = record.probs.shape
    load = record.load.float()
    entropy = -(record.probs * record.probs.clamp_min(1e-12).log()).sum(-1).mean()
    dropped_tokens = int((~record.kept).all(-1).sum()) if record.kept is not None else 0
    return {
        "tokens": n_tokens,
        "experts": n_experts,
        "top_k": record.expert_ids.shape[1],
        "load": record.load.tolist(),
        "max_load": int(load.max()),
        "mean_load": float(load.mean()),
        "max_over_mean": float(load.max() / load.mean().clamp_min(1e-9)),
        "maxvio": max_violation(load),
        "dropped_assignments": int(record.demand.sum() - record.load.sum()),
        "dropped_tokens": dropped_tokens,
        "routing_entropy": float(entropy),
        "routing_entropy_max": math.log(n_experts),
        "balance_loss": float(record.losses["balance"]),
        "z_loss": float(record.losses["z"]),
        "top_pairs": frequent_pairs(record.expert_ids, n_experts),
    }


def routing_divergence(load_a: torch.Tensor, load_b: torch.Tensor, top: int = 5) -> dict[str, Any]:
    """How differently two texts use one layer's experts: the Jensen-Shannon divergence (bits, 0 = the
    same shares, 1 = disjoint experts) of their expert-load shares, and the experts each prefers most."""
    share_a = load_a.double() / load_a.sum().clamp_min(1)
    share_b = load_b.double() / load_b.sum().clamp_min(1)
    middle = (share_a + share_b) / 2

    def kl(p: torch.Tensor) -> torch.Tensor:
        return (p * (p.clamp_min(1e-30) / middle.clamp_min(1e-30)).log2()).sum()

    difference = share_a - share_b
    return {"divergence": float((kl(share_a) + kl(share_b)) / 2),
            "share_difference": [round(float(d), 6) for d in difference],
            "prefers_a": [int(e) for e in difference.argsort(descending=True)[:top] if difference[e] > 0],
            "prefers_b": [int(e) for e in difference.argsort()[:top] if difference[e] < 0]}


def retrieval_recall(a: torch.Tensor, b: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Cross-modal retrieval over paired embeddings a, b [N, D] (pair i matches i): recall@k, the share of
    queries whose match ranks in the top k by cosine similarity, averaged over both directions."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    similarity = a @ b.T
    out = {}
    for k in ks:
        hits = [(s.topk(min(k, len(s)), dim=-1).indices == torch.arange(len(s), device=s.device)[:, None]).any(-1)
                for s in (similarity, similarity.T)]
        out[f"recall@{k}"] = float(torch.cat(hits).float().mean())
    return out
