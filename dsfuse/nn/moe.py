"""DeepSeekMoE: shared experts plus fine-grained routed SwiGLU experts, top-k routing, capacity and
load balancing.

    layer = MoE(MoEConfig(dim=256, n_experts=64, top_k=6, n_shared=2, expert_hidden=128))
    y = layer(x)                      # x [..., dim]
    loss = task_loss + moe_aux_loss(model)   # every MoE layer's weighted auxiliary losses

After each forward a layer holds `aux_losses` (weighted terms to add to the training loss: "balance",
"seq_balance", "z"; only those with a non-zero weight) and `last_routing` (detached facts for
inspection: expert ids, kept assignments, loads, probabilities, the unweighted losses).

Routers: "topk" (softmax, DeepSeek-V2/Switch), "noisy" (Shazeer et al. 2017: tunable Gaussian noise on
the logits while training), "aux-free" (DeepSeek-V3: sigmoid affinities, top-k chosen on affinity +
a per-expert bias that is nudged after every training forward towards equal loads; no gradient), "hash"
(DeepSeek-V4's first layers: a fixed token-id -> experts table `tid2eid` picks, the learned affinities
weigh; the layer then needs `token_ids`). `affinity` (sigmoid or V4's sqrt-softplus) is the aux-free and
hash routers' score.
The options of released checkpoints: `norm_topk` (renormalise the k chosen weights), `route_scale`
(DeepSeek's routed_scaling_factor), group-limited selection (`n_groups`/`topk_groups`: only experts of
the best groups compete; a group scores by its best expert, or for "aux-free" by its two best biased
affinities as in DeepSeek-V3), a shared expert of its own width and Qwen2-MoE's sigmoid gate on it.
Dispatch sorts assignments by expert once; "sorted" (the default) then runs each expert on its
contiguous slice and adds the gated output straight back, "padded" runs all experts as one batched
matmul over a buffer padded to the busiest expert's load, "grouped" uses torch's grouped matmul.
All equal `moe_naive`, the seed's per-expert boolean-mask loop (tests and bench/moe.py check it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsfuse import choices
from dsfuse.nn.ffn import SwiGLU, swiglu

DISPATCHES = ("sorted", "padded", "grouped")


@dataclass
class MoEConfig:
    dim: int = 256
    n_experts: int = 64  # routed experts
    top_k: int = 6
    n_shared: int = 2  # always-on experts, merged into one SwiGLU of n_shared * expert_hidden
    expert_hidden: int = 128
    router: choices.MoERouter = "topk"
    capacity_factor: float = 0.0  # 0: dropless; else each expert takes ceil(cf * tokens * k / experts)
    balance_weight: float = 0.01  # Switch-form load-balancing loss
    seq_balance_weight: float = 0.0  # DeepSeek-V3's sequence-wise balance loss
    z_weight: float = 0.001  # router z-loss
    bias_update_rate: float = 0.001  # aux-free: how far each forward nudges the expert biases
    dispatch: str = "sorted"  # sorted | padded | grouped
    norm_topk: bool | None = None  # renormalise the chosen weights; None: the router's way (only aux-free does)
    route_scale: float = 1.0  # multiplies the routed experts' weights
    n_groups: int = 1  # experts fall into n_groups equal groups ...
    topk_groups: int = 1  # ... and a token chooses among the topk_groups best groups only
    shared_hidden: int | None = None  # the shared expert's width; None: n_shared * expert_hidden
    shared_gate: bool = False  # a sigmoid gate (Linear dim -> 1) on the shared expert's output
    affinity: choices.Affinity = "sigmoid"  # aux-free and hash: the score each expert's weight comes from
    vocab_size: int = 0  # hash: the token ids the table covers
    swiglu_limit: float = 0.0  # clip the experts' gate and up projections (DeepSeek-V4); 0: off

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be at least 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be between 1 and n_experts ({self.n_experts}), got {self.top_k}")
        choices.check(self.router, choices.MoERouter, "router")
        choices.check(self.affinity, choices.Affinity, "affinity")
        if self.router == "hash" and self.vocab_size < 1:
            raise ValueError("the hash router needs vocab_size, the token ids its table covers")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {', '.join(DISPATCHES)}, got {self.dispatch!r}")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor must be positive (or 0 for dropless), got {self.capacity_factor}")
        if self.n_shared < 0 or self.expert_hidden < 1:
            raise ValueError("n_shared must be >= 0 and expert_hidden >= 1")
        if self.n_groups < 1 or self.n_experts % self.n_groups or not 1 <= self.topk_groups <= self.n_groups:
            raise ValueError(f"n_groups {self.n_groups} must divide n_experts {self.n_experts} "
                             f"and topk_groups {self.topk_groups} be between 1 and n_groups")

    @property
    def shared_width(self) -> int:
        return self.shared_hidden if self.shared_hidden is not None else self.n_shared * self.expert_hidden

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments each expert may take for `n_tokens` tokens; None when dropless."""
        if not self.capacity_factor:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))


# --------------------------------------------------------------------------- experts

class SwiGLUExperts(nn.Module):
    """`n` SwiGLU experts stored as stacked weights, gate and up projections fused into one matmul."""

    def __init__(self, n: int, dim: int, hidden: int, limit: float = 0.0):
        super().__init__()
        self.hidden, self.limit = hidden, limit
        self.w13 = nn.Parameter(torch.empty(n, dim, 2 * hidden).uniform_(-dim**-0.5, dim**-0.5))
        self.w2 = nn.Parameter(torch.empty(n, hidden, dim).uniform_(-hidden**-0.5, hidden**-0.5))

    def expert(self, e: int, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Expert `e` on rows x [M, dim]; `scale` [M, 1] multiplies the hidden layer (cheaper than the output)."""
        hidden = self._gated(x @ self.w13[e])
        return (hidden if scale is None else hidden * scale) @ self.w2[e]

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own rows: x [n, C, dim] -> [n, C, dim]."""
        return torch.bmm(self._gated(torch.bmm(x, self.w13)), self.w2)

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, expert e owning rows offsets[e-1]:offsets[e] (int32 cumulative counts)."""
        return F.grouped_mm(self._gated(F.grouped_mm(x, self.w13, offs=offsets)), self.w2, offs=offsets)

    @torch.no_grad()
    def as_modules(self) -> nn.ModuleList:
        """The same experts as separate SwiGLU modules (copies): the unfused form of the seed's loop."""
        modules = nn.ModuleList()
        for w13, w2 in zip(self.w13, self.w2):
            expert = SwiGLU(w13.shape[0], self.hidden, limit=self.limit).to(w13)
            expert.w1.weight.copy_(w13[:, :self.hidden].T)
            expert.w3.weight.copy_(w13[:, self.hidden:].T)
            expert.w2.weight.copy_(w2.T)
            modules.append(expert)
        return modules

    def _gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(self.hidden, dim=-1)
        return swiglu(gate, up, self.limit)


# --------------------------------------------------------------------------- routers

@dataclass
class Routing:
    logits: torch.Tensor  # [N, E] router logits (float32)
    probs: torch.Tensor  # [N, E] the affinity distribution the balance losses use (rows sum to 1)
    expert_ids: torch.Tensor  # [N, k]
    weights: torch.Tensor  # [N, k] gate values multiplying each chosen expert's output
    log_norm: torch.Tensor  # [N] log-sum-exp of the logits (the router z-loss squares it)


AFFINITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "sqrtsoftplus": lambda logits: F.softplus(logits).sqrt()}


def hash_table(vocab_size: int, n_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """A fixed token-id -> k distinct experts table [vocab, k] for a fresh hash router (a checkpoint brings
    its own): a seeded shuffle of the ids, each id's k experts spread evenly round the ring of experts."""
    shuffled = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
    return (shuffled[:, None] + torch.arange(top_k) * (n_experts // top_k)) % n_experts


class Router(nn.Module):
    """Scores tokens against experts and picks k per token (see the module docstring for the kinds)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.kind, self.top_k = cfg.router, cfg.top_k
        self.n_groups, self.topk_groups, self.route_scale = cfg.n_groups, cfg.topk_groups, cfg.route_scale
        self.norm_topk = cfg.norm_topk if cfg.norm_topk is not None else cfg.router != "topk"
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        if self.kind == "noisy":
            self.noise = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
            nn.init.zeros_(self.noise.weight)  # start noiseless-but-trainable, as in Shazeer et al.
        if self.kind == "aux-free":
            self.register_buffer("bias", torch.zeros(cfg.n_experts))
        if self.kind == "hash":
            self.register_buffer("tid2eid", hash_table(cfg.vocab_size, cfg.n_experts, cfg.top_k))
        self.affinity = AFFINITIES[cfg.affinity]

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        logits = F.linear(x.float(), self.gate.weight.float())
        if self.kind in ("aux-free", "hash"):
            affinity = self.affinity(logits)
            if self.kind == "hash":
                if token_ids is None:
                    raise ValueError("the hash router routes by token id: pass token_ids")
                ids = self.tid2eid[token_ids.reshape(-1)]
            else:
                ids = self._choose(affinity + self.bias)  # the bias picks, never weighs
            probs = affinity / affinity.sum(-1, keepdim=True)
            return Routing(logits, probs, ids, self._weigh(affinity.gather(-1, ids), x.dtype),
                           torch.logsumexp(logits, dim=-1))
        if self.kind == "noisy" and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x).float())
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # kept: the z-loss needs it too
        probs = torch.exp(logits - log_norm)
        ids = self._choose(probs)
        return Routing(logits, probs, ids, self._weigh(probs.gather(-1, ids), x.dtype), log_norm[:, 0])

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The k best experts [N, k] by `scores` [N, E], among the topk_groups best groups when grouped."""
        if self.n_groups > 1:
            grouped = scores.view(scores.shape[0], self.n_groups, -1)
            group_score = grouped.topk(2, dim=-1)[0].sum(-1) if self.kind == "aux-free" else grouped.amax(-1)
            best = group_score.topk(self.topk_groups, dim=-1, sorted=False)[1]
            allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
            scores = grouped.masked_fill(~allowed[..., None], float("-inf")).view_as(scores)
        return scores.topk(self.top_k, dim=-1, sorted=False)[1]

    def _weigh(self, chosen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The gate values of the chosen experts' scores [N, k]: renormalised when asked, then scaled."""
        if self.norm_topk:
            chosen = chosen / (chosen.sum(-1, keepdim=True) + 1e-20)
        return (chosen * self.route_scale).to(dtype)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: lower the bias of overloaded experts, raise the rest."""
        load = load.float()
        if dist.is_available() and dist.is_initialized():  # every rank must keep the same biases
            dist.all_reduce(load)
        self.bias += rate * torch.sign(load.mean() - load)


# --------------------------------------------------------------------------- dispatch

@dataclass
class DispatchPlan:
    """Where each (token, choice) slot goes: slots sorted by expert, token order kept within an expert."""

    expert: torch.Tensor  # [N*k] the expert of each slot (token * k + choice)
    order: torch.Tensor  # [S] the kept slots, sorted by expert
    position: torch.Tensor  # [N*k] rank of each slot among its expert's slots
    demand: torch.Tensor  # [E] slots routed to each expert
    load: torch.Tensor  # [E] kept slots per expert
    kept: torch.Tensor | None  # [N*k] bool, None when nothing is dropped
    capacity: int | None


def plan_dispatch(expert_ids: torch.Tensor, n_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Sort the slots by expert; with a capacity, an expert keeps its first `capacity` tokens (in order)."""
    flat = expert_ids.flatten()
    order = flat.argsort(stable=True)
    demand = torch.bincount(flat, minlength=n_experts)
    starts = demand.cumsum(0) - demand
    position = torch.empty_like(flat)
    position[order] = torch.arange(len(flat), device=flat.device) - starts[flat[order]]
    if capacity is None:
        return DispatchPlan(flat, order, position, demand, demand, None, None)
    kept = position < capacity
    return DispatchPlan(flat, order[kept[order]], position, demand, demand.clamp(max=capacity), kept, capacity)


def _combine(expert_out: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum each token's k expert outputs, weighted: rows [R, D] picked per slot, then [N, k] x [N, k, D]."""
    picked = expert_out.index_select(0, row_of_slot).view(*weights.shape, -1)
    return torch.einsum("nk,nkd->nd", weights, picked)


def dispatch_padded(x: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan, experts: SwiGLUExperts
                    ) -> torch.Tensor:
    """One batched matmul over [E, C, D], C the busiest expert's load: no Python loop over experts."""
    n_experts, k = experts.w13.shape[0], weights.shape[1]
    rows = int(plan.load.max())  # the one host sync
    slot_row = plan.expert * rows + plan.position  # where each slot sits in the padded buffer
    buffer = x.new_zeros(n_experts * rows, x.shape[1]).index_copy_(
        0, slot_row[plan.order], x.index_select(0, plan.order // k))
    out = experts.batched(buffer.view(n_experts, rows, -1)).view(n_experts * rows, -1)
    if plan.kept is not None:  # dropped slots read row 0 with weight 0
        slot_row = torch.where(plan.kept, slot_row, 0)
        weights = weights * plan.kept.view_as(weights)
    return _combine(out, slot_row, weights)


def dispatch_sorted(x: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan, experts: SwiGLUExperts
                    ) -> torch.Tensor:
    """Each expert on its contiguous slice of the sorted slots: gather its tokens, run it, and add the
    gated output straight back into place, so every buffer stays small and cache-hot."""
    k = weights.shape[1]
    tokens = plan.order // k
    gates = weights.flatten().index_select(0, plan.order)[:, None]
    out = torch.zeros_like(x)
    start = 0
    for e, count in enumerate(plan.load.tolist()):  # the one host sync
        if count:
            rows = tokens[start:start + count]
            out.index_add_(0, rows, experts.expert(e, x.index_select(0, rows), gates[start:start + count]))
        start += count
    return out


def dispatch_grouped(x: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan, experts: SwiGLUExperts
                     ) -> torch.Tensor:
    """torch's grouped matmul over all sorted tokens at once (fast on recent GPUs; a loop inside on CPU)."""
    k = weights.shape[1]
    out = experts.grouped(x.index_select(0, plan.order // k), plan.load.cumsum(0).to(torch.int32))
    row_of_slot = torch.zeros(x.shape[0] * k, dtype=torch.long, device=x.device)  # dropped slots: row 0 ...
    row_of_slot[plan.order] = torch.arange(len(plan.order), device=x.device)
    if plan.kept is not None:
        weights = weights * plan.kept.view_as(weights)  # ... with weight 0
    return _combine(out, row_of_slot, weights)


DISPATCH = {"padded": dispatch_padded, "sorted": dispatch_sorted, "grouped": dispatch_grouped}


def moe_naive(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              experts: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """The seed's loop, kept as the reference: per expert, a boolean mask of its tokens, run the expert
    on them, add the weighted output. `experts[e]` maps rows [M, D] to [M, D]."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        hit = expert_ids == e
        tokens = hit.any(-1)
        if tokens.any():
            out[tokens] += expert(x[tokens]) * (weights * hit).sum(-1)[tokens, None]
    return out


# --------------------------------------------------------------------------- losses

def balance_loss(probs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Switch Transformer form: E * sum_i f_i * P_i (f: share of assignments, P: mean probability); 1 when even."""
    share = load.float() / load.sum().clamp_min(1)
    return probs.shape[-1] * (share * probs.mean(0)).sum()


def seq_balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: the Switch form within each sequence, averaged."""
    n_experts = probs.shape[-1]
    probs = probs.view(n_seqs, -1, n_experts)
    ids = expert_ids.view(n_seqs, -1)
    load = torch.zeros(n_seqs, n_experts, device=probs.device).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=torch.float32))
    share = load / ids.shape[1]
    return n_experts * (share * probs.mean(1)).sum(-1).mean()


def z_loss(log_norm: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss from each token's log-sum-exp of the logits: mean square, keeping logits small."""
    return log_norm.square().mean()


@dataclass
class RoutingRecord:
    """Detached facts about a layer's last forward, for inspection and plots."""

    expert_ids: torch.Tensor  # [N, k]
    kept: torch.Tensor | None  # [N, k] bool
    load: torch.Tensor  # [E] kept assignments per expert
    demand: torch.Tensor  # [E] assignments routed to each expert before the capacity cut
    probs: torch.Tensor  # [N, E]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted balance, seq_balance, z
    weights: torch.Tensor | None = None  # [N, k] the gate value of each chosen expert


# --------------------------------------------------------------------------- the layer

class MoE(nn.Module):
    """DeepSeekMoE: y = shared(x) + sum over the k chosen routed experts of gate * expert(x)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = SwiGLUExperts(cfg.n_experts, cfg.dim, cfg.expert_hidden, cfg.swiglu_limit)
        self.shared = SwiGLU(cfg.dim, cfg.shared_width, limit=cfg.swiglu_limit) if cfg.shared_width else None
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_gate and self.shared is not None else None
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_routing: RoutingRecord | None = None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens, token_ids)
        plan = plan_dispatch(routing.expert_ids, self.cfg.n_experts, self.cfg.capacity(tokens.shape[0]))
        y = DISPATCH[self.cfg.dispatch](tokens, routing.weights, plan, self.experts)
        if self.shared is not None:
            shared = self.shared(tokens)
            y = y + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(tokens)) * shared)
        self._account(routing, plan, n_seqs=tokens.shape[0] // shape[-2] if len(shape) > 2 else 1)
        return y.view(shape)

    def _account(self, routing: Routing, plan: DispatchPlan, n_seqs: int) -> None:
        """Auxiliary losses, the routing record, and the aux-free bias step."""
        cfg = self.cfg
        raw = {"balance": balance_loss(routing.probs, plan.demand), "z": z_loss(routing.log_norm)}
        if cfg.seq_balance_weight:
            raw["seq_balance"] = seq_balance_loss(routing.probs, routing.expert_ids, n_seqs)
        weights = {"balance": cfg.balance_weight, "seq_balance": cfg.seq_balance_weight, "z": cfg.z_weight}
        self.aux_losses = {name: weights[name] * loss for name, loss in raw.items() if weights[name]}
        kept = plan.kept.view_as(routing.expert_ids) if plan.kept is not None else None
        self.last_routing = RoutingRecord(routing.expert_ids.detach(), kept, plan.load.detach(),
                                          plan.demand.detach(), routing.probs.detach(),
                                          {name: loss.detach() for name, loss in raw.items()},
                                          routing.weights.detach())
        if cfg.router == "aux-free" and self.training:
            self.router.update_bias(plan.load, cfg.bias_update_rate)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer inside a model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of every MoE layer's weighted auxiliary losses from its last forward (0 if none)."""
    terms = [loss for layer in moe_layers(model) for loss in layer.aux_losses.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())
