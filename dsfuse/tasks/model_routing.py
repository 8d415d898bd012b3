"""Routing of a real MoE model on real text: which experts each token of each layer goes to, how
unbalanced each layer is, and how two texts differ in the experts they prefer.

The model (a Hugging Face folder or Hub id) is streamed: its shards are memory-mapped and one decoder
layer's weights are resident at a time, so a model larger than memory can still be inspected.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsfuse.choices import ComputeDtype
from dsfuse.errors import UsageError
from dsfuse.weights import model_folder
from dsfuse.io import atomic_path, check_writable
from dsfuse.metrics import routing_divergence, routing_stats
from dsfuse.models.hf import ModelFolder, load_module, skeleton, streamed_layers
from dsfuse.nn.kv_compression import visible_rows
from dsfuse.nn.moe import MoE, RoutingRecord
from dsfuse.nn.v4_attention import V4Attention
from dsfuse.plots import plot_load_heatmap, plot_route_compare, plot_sparse_pattern
from dsfuse.report import warn

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TextRoutes:
    """One text through the model: its tokens (as they read in the text) and each MoE layer's routing."""

    source: str
    tokens: list[str]
    layers: list[tuple[str, RoutingRecord]]
    attention: list[dict[str, Any]]  # DeepSeek-V4's compressed layers: see attention_facts


def read_text(arg: str) -> tuple[str, str]:
    """(text, where it came from) for `--text`: `-` reads stdin, an existing file is read as UTF-8,
    anything else is the text itself. Empty or undecodable text is a usage error."""
    if arg == "-":
        data, source = sys.stdin.buffer.read(), "stdin"
    elif _is_file(arg):
        data, source = Path(arg).read_bytes(), arg
    elif " " not in arg and Path(arg).suffix in (".txt", ".md", ".py", ".json", ".jsonl", ".csv", ".html"):
        raise UsageError("no such text file", arg)
    else:
        data, source = arg.encode(), "the given text"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("the text is not UTF-8", source) from None
    if not text.strip():
        raise UsageError("the text is empty", source)
    return text, source


def _is_file(arg: str) -> bool:
    """Whether `arg` names a file; a long sentence is no file name (the OS refuses to look it up)."""
    try:
        return Path(arg).is_file()
    except OSError:
        return False


def route_text(folder: ModelFolder, tokenizer: Any, text: str, source: str, dtype: torch.dtype | None,
               max_tokens: int, quiet: bool = False, device: torch.device | None = None) -> TextRoutes:
    """Tokenize `text` and send it through the model layer by layer (streamed; each layer moved to
    `device` while it runs), keeping each MoE layer's routing record."""
    encoding = tokenizer.encode(text)
    ids = encoding.ids
    if len(ids) > max_tokens:
        warn(f"{source}: {len(ids)} tokens, routing the first {max_tokens} (--max-tokens)", quiet)
        ids = ids[:max_tokens]
    if len(ids) > folder.config.max_seq_len:
        raise UsageError(f"{len(ids)} tokens, beyond the model's maximum context of {folder.config.max_seq_len} "
                         "(route fewer with --max-tokens)", source)
    if max(ids) >= folder.config.vocab_size:
        raise UsageError(f"the tokenizer gives id {max(ids)}, beyond the model's vocabulary of "
                         f"{folder.config.vocab_size}", folder.path / "tokenizer.json")
    tokens = [text[a:b] if b > a else encoding.tokens[i] for i, (a, b) in enumerate(encoding.offsets[:len(ids)])]
    model = skeleton(folder)
    device = device or torch.device("cpu")
    load_module(folder, model.embed, "embed.", dtype)
    with torch.inference_mode():
        token_ids = torch.tensor([ids], device=device)
        x = model.enter(model.embed.to(device)(token_ids))
        model.embed.to("meta")
        layers, attention = [], []
        for i, layer in enumerate(streamed_layers(folder, model, dtype)):
            layer.to(device)
            x = layer(x.to(next(layer.parameters()).dtype), causal=True, token_ids=token_ids)
            if isinstance(layer.ffn, MoE):  # a hash-routed layer's load is fixed by the text's token ids
                hashed = " (hash)" if layer.ffn.router.kind == "hash" else ""
                layers.append((f"layer {i}{hashed}", layer.ffn.last_routing))
            if isinstance(layer.attn, V4Attention) and layer.attn.compressor is not None:
                attention.append(attention_facts(f"layer {i}", layer.attn, len(ids)))
    if not layers:
        raise UsageError(f"the model ({folder.arch.name}) has no MoE layer", folder.path)
    return TextRoutes(source, tokens, layers, attention)


def attention_facts(name: str, attn: V4Attention, length: int) -> dict[str, Any]:
    """A compressed V4 layer's last forward: its type, the share of attention mass outside the local window,
    and `pattern` [queries, rows]: 1 where a query attended to a compressed row (CSA: the indexer's picks;
    HCA: every row whose window had closed)."""
    rate = attn.cfg.compress_rate
    rows = length // rate
    visible = torch.arange(rows)[None, :] < visible_rows(torch.arange(length), rate)[:, None]
    if attn.indexer is not None:
        picks = attn.last_selection[0].cpu()
        pattern = torch.zeros(length, rows + 1).scatter_(1, picks.masked_fill(picks < 0, rows), 1.0)[:, :rows]
    else:
        pattern = visible.float()
    return {"layer": name, "type": attn.cfg.layer_type, "rate": rate, "rows": rows,
            "outside_window": attn.last_outside_share, "pattern": pattern.tolist()}


def layer_rows(routes: TextRoutes) -> list[dict[str, Any]]:
    return [{"layer": name, **routing_stats(record)} for name, record in routes.layers]


def write_routes(all_routes: list[TextRoutes], path: Path) -> Path:
    """JSON Lines: one record per text, token and MoE layer (text, token index and text, layer, the
    experts by falling weight, their weights)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        for routes in all_routes:
            for name, record in routes.layers:
                weights = record.weights.float()
                order = weights.argsort(dim=-1, descending=True)
                experts, weights = record.expert_ids.gather(-1, order), weights.gather(-1, order)
                for i, token in enumerate(routes.tokens):
                    out.write(json.dumps({"text": routes.source, "token_index": i, "token": token, "layer": name,
                                          "experts": experts[i].tolist(),
                                          "weights": [round(w, 6) for w in weights[i].tolist()]}) + "\n")
    return path


def inspect_model(model: str, text: str, *, compare: str | None = None, dtype: ComputeDtype = "auto",
                  max_tokens: int = 4096, plot: Path | None = None, routes_out: Path | None = None,
                  attention: Path | None = None, force: bool = False, quiet: bool = False,
                  device: torch.device | None = None) -> dict[str, Any]:
    """Route `text` (and the `compare` text) through `model`: per-layer statistics and, asked for, a
    heatmap (or the comparison plot), the routes file and DeepSeek-V4's attention report (`attention`: the
    sparse-pattern picture). Every output is checked before any work."""
    for path in (plot, routes_out, attention):
        if path is not None:
            check_writable(path, force)
    for path in (plot, attention):
        if path is not None and path.suffix.lower() != ".png":
            raise UsageError("the picture is a PNG: give a path ending in .png", path)
    texts = [read_text(t) for t in (text, compare) if t is not None]
    if len(texts) == 2 and texts[0][1] == texts[1][1] == "stdin":
        raise UsageError("stdin can be only one of the two texts", "--compare")
    folder = ModelFolder(model_folder(model, quiet=quiet))
    tokenizer = folder.tokenizer()
    routes = [route_text(folder, tokenizer, t, source, DTYPES[dtype], max_tokens, quiet, device)
              for t, source in texts]
    first = routes[0]
    rows = layer_rows(first)
    maxvio = [r["maxvio"] for r in rows]
    result: dict[str, Any] = {"model": model, "architecture": folder.arch.name, "text": first.source,
                              "tokens": len(first.tokens), "maxvio_mean": sum(maxvio) / len(maxvio),
                              "maxvio_max": max(maxvio), "layers": rows}
    if compare is not None:
        second = routes[1]
        result["compare"] = {"text_b": second.source, "tokens_b": len(second.tokens),
                             "layers": [{"layer": name, **routing_divergence(a.load, b.load)}
                                        for (name, a), (_, b) in zip(first.layers, second.layers)]}
        if plot is not None:
            result["plot"] = str(plot_route_compare(result["compare"]["layers"], plot, first.source, second.source))
    elif plot is not None:
        result["plot"] = str(plot_load_heatmap(rows, plot, f"expert load, {model} on {first.source}"))
    if routes_out is not None:
        result["routes"] = str(write_routes(routes, routes_out))
    if attention is not None:
        if not first.attention:
            raise UsageError(f"--attention reports DeepSeek-V4's compressed attention; {folder.arch.name} has none",
                             "--attention")
        result["attention"] = [{k: v for k, v in layer.items() if k != "pattern"} for layer in first.attention]
        result["attention_plot"] = str(plot_sparse_pattern(
            first.attention, attention, f"compressed rows attended, {model} on {first.source}"))
    return result
