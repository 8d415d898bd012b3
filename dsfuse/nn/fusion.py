"""Multimodal fusion: one interface over the strategies of `choices.Fusion`, all built on nn/attention.

Every strategy maps M modality token sequences [B, T_m, dim] with padding masks bool [B, T_m]
(True = real token) to [B, out_dim], logits when the fusion ends a classifier:

    fusion = ModalityFusion(FusionConfig("mid", input_dims=(256, 192), out_dim=10))
    logits = fusion([video_tokens, audio_tokens], [None, audio_mask])

`ModalityFusion` projects each modality to the shared width first; the strategy classes below take
tokens already at `cfg.dim` and can be used on their own.

- none: no fusion, the unimodal baseline: the first modality alone, its masked mean into the same
  classifier head (the other modalities are ignored and may be left out).
- early: modality embeddings, all tokens concatenated, one transformer over the joint sequence.
- mid: MulT-style bidirectional cross-modal layers (each modality attends to the others),
  optionally with ParallelCrossAttention-style gates on what each token lets in.
- late: each modality decides alone; logits mixed with learned modality weights (no interaction).
- gated: a gated multimodal unit: per-sample softmax gates over the modalities' summaries
  (sampled with Gumbel noise in training).
- bottleneck: modalities exchange information only through a few shared tokens (MBT).
- qformer: learned queries read one modality (BLIP-2), then join the others' tokens.
- hybrid: early fusion's joint logits plus late fusion's per-modality logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsfuse import choices
from dsfuse.errors import UsageError
from dsfuse.nn.attention import AttentionConfig
from dsfuse.nn.transformer import CrossAttentionBlock, TransformerBlock

STRATEGIES = choices.values(choices.Fusion)

Tokens = Sequence[torch.Tensor]
Masks = Sequence[torch.Tensor]


@dataclass
class FusionConfig:
    strategy: choices.Fusion = "mid"
    input_dims: tuple[int, ...] = (128, 128)  # width of each modality's tokens, in call order
    out_dim: int = 2
    dim: int = 128  # the shared width inside the fusion
    n_heads: int = 4
    depth: int = 2  # fusion layers (per modality where a strategy keeps them apart)
    ffn_mult: int = 2
    # RoPE in the fusion layers: off, because positions in a concatenated sequence would shift with
    # the padding of the modality before; order within a modality is its encoder's to encode
    rope: bool = False
    gated_cross: bool = False  # mid: per-token gates on the cross-modal update
    n_bottleneck: int = 4  # bottleneck: shared tokens
    n_queries: int = 8  # qformer: learned queries
    query_modality: int = 0  # qformer: which modality the queries read

    def __post_init__(self) -> None:
        self.input_dims = tuple(int(d) for d in self.input_dims)
        choices.check(self.strategy, choices.Fusion, "fusion strategy")
        if len(self.input_dims) < (1 if self.strategy == "none" else 2):
            raise ValueError(f"{self.strategy} fusion needs at least two modalities, got {len(self.input_dims)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if min(self.depth, self.n_bottleneck, self.n_queries, self.out_dim, *self.input_dims) < 1:
            raise ValueError("depth, n_bottleneck, n_queries, out_dim and input_dims must be at least 1")
        if not 0 <= self.query_modality < len(self.input_dims):
            raise ValueError(f"query_modality {self.query_modality} is not one of the "
                             f"{len(self.input_dims)} modalities")

    @property
    def n_modalities(self) -> int:
        return len(self.input_dims)

    @property
    def n_read(self) -> int:
        """The modalities the strategy reads: the first alone without fusion, else all of them."""
        return 1 if self.strategy == "none" else self.n_modalities

    def attention(self) -> AttentionConfig:
        return AttentionConfig(dim=self.dim, n_heads=self.n_heads, rope=self.rope)

    def block(self) -> TransformerBlock:
        return TransformerBlock(self.dim, self.attention(), ffn_hidden=self.ffn_mult * self.dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: x [B, T, D], mask [B, T] -> [B, D]."""
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def classifier_head(in_dim: int, dim: int, out_dim: int) -> nn.Sequential:
    """What turns a fused vector into logits: a one-hidden-layer MLP, the same for every strategy."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, out_dim))


class NoFusion(nn.Module):
    """The unimodal baseline: the first modality's masked mean into the classifier head."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.head = classifier_head(cfg.dim, cfg.dim, cfg.out_dim)

    def forward(self, xs: Tokens, masks: Masks) -> torch.Tensor:
        return self.head(masked_mean(xs[0], masks[0]))


class EarlyFusion(nn.Module):
    """Tag tokens with a modality embedding, concatenate, and run one transformer over them all."""

    def __init__(self, cfg: FusionConfig, depth: int | None = None):
        super().__init__()
        self.modality_embedding = nn.Parameter(torch.randn(cfg.n_modalities, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(cfg.block() for _ in range(depth or cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = classifier_head(cfg.dim, cfg.dim, cfg.out_dim)

    def joint(self, xs: Tokens, masks: Masks) -> torch.Tensor:
        """The pooled joint representation [B, dim]."""
        x = torch.cat([x + emb for x, emb in zip(xs, self.modality_embedding)], dim=1)
        mask = torch.cat(list(masks), dim=1)
        for block in self.blocks:
            x = block(x, mask=mask)
        return masked_mean(self.norm(x), mask)

    def forward(self, xs: Tokens, masks: Masks) -> torch.Tensor:
        return self.head(self.joint(xs, masks))


class CrossAttentionFusion(nn.Module):
    """MulT: in every layer each modality attends to all the others' tokens, all updated in parallel."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(CrossAttentionBlock(cfg.dim, cfg.n_heads, cfg.ffn_mult * cfg.dim, cfg.gated_cross)
                          for _ in range(cfg.n_modalities))
            for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = classifier_head(cfg.n_modalities * cfg.dim, cfg.dim, cfg.out_dim)

    def forward(self, xs: Tokens, masks: Masks) -> torch.Tensor:
        xs = list(xs)
        for blocks in self.layers:
            contexts = [(torch.cat(xs[:m] + xs[m + 1:], 1), torch.cat(list(masks[:m]) + list(masks[m + 1:]), 1))
                        for m in range(len(xs))]
            xs = [block(x, context, context_mask) for block, x, (context, context_mask) in zip(blocks, xs, contexts)]
        return self.head(torch.cat([masked_mean(self.norm(x), m) for x, m in zip(xs, masks)], -1))


class LateFusion(nn.Module):
    """Each modality is encoded and classified on its own; the logits are mixed with learned weights."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.encoders = nn.ModuleList(nn.ModuleList(cfg.block() for _ in range(cfg.depth))
                                      for _ in range(cfg.n_modalities))
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.dim) for _ in range(cfg.n_modalities))
        self.heads = nn.ModuleList(classifier_head(cfg.dim, cfg.dim, cfg.out_dim) for _ in range(cfg.n_modalities))
        self.modality_logits = nn.Parameter(torch.zeros(cfg.n_modalities))

    def modality_weights(self) -> torch.Tensor:
        """The learned mixing weights [M], summing to 1."""
        return self.modality_logits.softmax(0)

    def forward(self, xs: Tokens, masks: Masks) -> torch.Tensor:
        logits = []
        for x, mask, blocks, norm, head in zip(xs, masks, self.encoders, self.norms, self.heads):
            for block in blocks:
                x = block(x, mask=mask)
            logits.append(head(masked_mean(norm(x), mask)))
        return torch.einsum("m,mbc->bc", self.modality_weights(), torch.stack(logits))


class GatedFusion(nn.Module):
    """A gated multimodal unit: a softmax over modalities, computed from all of them, weighs each one's summary.

    Each summary is layer-normalised without a learned scale, so a modality's share of the fused
    vector is set by its gate alone. In training the gates are sampled (Gumbel-softmax): a sample
    that leans on a useless modality costs loss, so the gate itself, not only the head downstream,
    learns to turn such a modality down. Evaluation uses the expected gates; after forward,
    `last_gates` [B, M] holds them.
    """

    def __init__(self, cfg: FusionConfig, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.encoders = nn.ModuleList(nn.ModuleList(cfg.block() for _ in range(cfg.depth))
                                      for _ in range(cfg.n_modalities))
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.dim) for _ in range(cfg.n_modalities))
        self.values = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim) for _ in range(cfg.n_modalities))
        self.gate = nn.Linear(cfg.n_modalities * cfg.dim, cfg.n_modalities)
        nn.init.zeros_(self.gate.weight)  # start even-handed: every modality weighs 1/M
        self.head = classifier_head(cfg.dim, cfg.dim, cfg.out_dim)
        self.last_gates: torch.Tensor | None = None

    def forward(self, xs: Tokens, masks: Masks) -> torch.Tensor:
        summaries = []
        for x, mask, blocks, norm in zip(xs, masks, self.encoders, self.norms):
            for block in blocks:
                x = block(x, mask=mask)
            summaries.append(masked_mean(norm(x), mask))
        # a unit-norm input keeps Adam's per-step change of a gate logit near lr, not lr x fan-in
        logits = self.gate(F.normalize(torch.cat(summaries, -1), dim=-1))  # [B, M]
        gates = logits.softmax(-1)
        self.last_gates = gates.detach()
        used = F.gumbel_softmax(logits, tau=self.temperature) if self.training else gates
        values = torch.stack([F.layer_norm(value(s), s.shape[-1:]) for value, s in zip(self.values, summaries)], 1)
        return self.head(torch.einsum("bm,bmd->bd", used, values))


class BottleneckFusion(nn.Module):
    """Attention bottlenecks (Nagrani et al. 2021): each modality's layer sees its own tokens plus a
    few shared tokens; the shared tokens' updates are averaged over modalities, the only crossing."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.bottleneck = nn.Parameter(torch.randn(cfg.n_bottleneck, cfg.dim) * 0.02)
        self.layers = nn.ModuleList(nn.ModuleList(cfg.block() for _ in range(cfg.n_modalities))
                                    for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = classifier_head(cfg.n_modalities * cfg.dim, cfg.dim, cfg.out_dim)

    def forward(self, xs: Tokens, masks: Masks) -> torch.Tensor:
        xs = list(xs)
        shared = self.bottleneck.expand(xs[0].shape[0], -1, -1)
        shared_mask = torch.ones(shared.shape[:2], dtype=torch.bool, device=shared.device)
        for blocks in self.layers:
            updates = []
            for m, block in enumerate(blocks):
                length = xs[m].shape[1]
                out = block(torch.cat([xs[m], shared], 1), mask=torch.cat([masks[m], shared_mask], 1))
                xs[m], update = out[:, :length], out[:, length:]
                updates.append(update)
            shared = torch.stack(updates).mean(0)
        return self.head(torch.cat([masked_mean(self.norm(x), m) for x, m in zip(xs, masks)], -1))


class QFormerFusion(nn.Module):
    """BLIP-2's Q-Former: learned queries self-attend and read one modality through cross-attention
    (`depth` layers); the queries then join the other modalities' tokens in one transformer block."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.source = cfg.query_modality
        self.queries = nn.Parameter(torch.randn(cfg.n_queries, cfg.dim) * 0.02)
        self.query_layers = nn.ModuleList(
            nn.ModuleList([cfg.block(), CrossAttentionBlock(cfg.dim, cfg.n_heads, cfg.ffn_mult * cfg.dim)])
            for _ in range(cfg.depth))
        self.joint = EarlyFusion(cfg, depth=1)

    def forward(self, xs: Tokens, masks: Masks) -> torch.Tensor:
        q = self.queries.expand(xs[0].shape[0], -1, -1)
        for self_block, cross_block in self.query_layers:
            q = cross_block(self_block(q), xs[self.source], masks[self.source])
        xs, masks = list(xs), list(masks)
        xs[self.source], masks[self.source] = q, torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        return self.joint(xs, masks)


class HybridFusion(nn.Module):
    """Early fusion's joint logits plus late fusion's per-modality logits: interaction where it
    helps, and each modality still heard on its own."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.early, self.late = EarlyFusion(cfg), LateFusion(cfg)

    def forward(self, xs: Tokens, masks: Masks) -> torch.Tensor:
        return self.early(xs, masks) + self.late(xs, masks)


FUSION_CLASSES: dict[str, type[nn.Module]] = {
    "none": NoFusion, "early": EarlyFusion, "mid": CrossAttentionFusion, "late": LateFusion, "gated": GatedFusion,
    "bottleneck": BottleneckFusion, "qformer": QFormerFusion, "hybrid": HybridFusion,
}


class ModalityFusion(nn.Module):
    """Project each modality the strategy reads to the shared width, fill in missing masks, and fuse."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.inputs = nn.ModuleList(nn.Linear(d, cfg.dim) for d in cfg.input_dims[:cfg.n_read])
        self.strategy = FUSION_CLASSES[cfg.strategy](cfg)

    def forward(self, tokens: Tokens, masks: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """tokens: M tensors [B, T_m, D_m] (without fusion, the first alone will do); masks: M bool [B, T_m]
        or None (all real) -> [B, out_dim]."""
        masks = list(masks) if masks is not None else [None] * len(tokens)
        if len(tokens) not in (self.cfg.n_read, self.cfg.n_modalities) or len(masks) != len(tokens):
            raise ValueError(f"expected {self.cfg.n_modalities} modalities (and as many masks), "
                             f"got {len(tokens)} and {len(masks)}")
        batch = tokens[0].shape[0]
        for m, (x, mask, width) in enumerate(zip(tokens, masks, self.cfg.input_dims)):
            if x.ndim != 3 or x.shape[0] != batch or x.shape[-1] != width:
                raise ValueError(f"modality {m}: expected tokens [{batch}, T, {width}], got {list(x.shape)}")
            if mask is not None and mask.shape != x.shape[:2]:
                raise ValueError(f"modality {m}: mask {list(mask.shape)} does not match tokens {list(x.shape[:2])}")
        xs = [proj(x) for proj, x in zip(self.inputs, tokens)]
        full = [torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()
                for x, mask in zip(xs, masks)]
        return self.strategy(xs, full)

    def gate_weights(self) -> torch.Tensor | None:
        """Per-sample gate weights [B, M] of the last forward (gated fusion), else None."""
        return getattr(self.strategy, "last_gates", None)

    def modality_weights(self) -> torch.Tensor | None:
        """Learned per-modality logit weights [M] (late and hybrid fusion), else None."""
        late = self.strategy.late if isinstance(self.strategy, HybridFusion) else self.strategy
        return late.modality_weights().detach() if isinstance(late, LateFusion) else None


# --------------------------------------------------------------------------- contrastive alignment

def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over unit vectors a, b [N, D]: pair i is the positive of row i and of
    column i, every other pairing in the batch a negative; the similarity is scaled by exp(logit_scale)."""
    logits = logit_scale.exp().clamp(max=100.0) * a @ b.T
    targets = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class ContrastiveAlignment(nn.Module):
    """CLIP-style alignment of two modalities, a training objective beside any fusion strategy: each
    modality's masked-mean tokens are projected into one space and normalised; `contrastive_loss(model)`
    pulls a sample's two embeddings together and pushes the batch's other pairings apart, with a learned
    temperature (initialised at CLIP's 0.07). The embeddings of the last forward are kept in `last`."""

    def __init__(self, input_dims: tuple[int, int], dim: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(d, dim) for d in input_dims)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, tokens: Tokens, masks: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Two modalities' tokens [B, T_m, D_m] and masks -> their unit embeddings [B, dim] each."""
        pooled = [masked_mean(x, mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool,
                                                                           device=x.device))
                  for x, mask in zip(tokens, masks)]
        first, second = (F.normalize(proj(x), dim=-1) for proj, x in zip(self.projections, pooled))
        self.last = (first, second)
        return first, second


def check_contrastive(weight: float, fused: bool) -> None:
    """Refuse a contrastive weight that is negative, or given to a model with one modality."""
    if weight < 0:
        raise UsageError(f"must be 0 (off) or more, got {weight}", "--contrastive")
    if weight and not fused:
        raise UsageError("contrastive alignment needs two modalities: give --fusion too", "--contrastive")


def contrastive_loss(model: nn.Module) -> torch.Tensor:
    """The InfoNCE of every ContrastiveAlignment in `model` from its last forward (0 if none)."""
    terms = [info_nce(*m.last, m.logit_scale) for m in model.modules()
             if isinstance(m, ContrastiveAlignment) and m.last is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def alignment_embeddings(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (detached) embeddings of the model's ContrastiveAlignment in its last forward, or None."""
    found = [m.last for m in model.modules() if isinstance(m, ContrastiveAlignment) and m.last is not None]
    return (found[0][0].detach(), found[0][1].detach()) if found else None
