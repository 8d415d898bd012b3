"""The unified-token task: train one MoE decoder over text and VQ image tokens in both directions
(`train-unified`), draw images from a prompt (`sample --prompt`), caption images (`caption`), and write a
generated captioned set (`make-shapes`).

A run directory holds model.safetensors (kind "unified"), its own copy of the VQ tokenizer
(tokenizer.safetensors), the BPE text tokenizer trained on its captions (text_tokenizer.json), and
probe.safetensors: a fixed batch of its training sequences, which `moe-inspect` routes to show how text
and image tokens spread over the experts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

from dsfuse import choices, runs
from dsfuse.checkpoint import CheckpointMeta, build_model, load_checkpoint, read_metadata, resolve_checkpoint
from dsfuse.data.bpe import load_bpe, save_bpe, train_bpe
from dsfuse.data.captioned import read_captioned, write_captioned_set
from dsfuse.data.images import load_image, save_grid, save_png
from dsfuse.device import seed_everything, select_device
from dsfuse.diffusion.latents import keep_tokenizer, load_tokenizer
from dsfuse.diffusion.pipeline import TOKENIZER_FILE
from dsfuse.engine import TrainConfig, TrainResult, fit, unwrap
from dsfuse.errors import InputError, UsageError
from dsfuse.io import atomic_path, claim_output_folder, write_text
from dsfuse.models.unified import UnifiedCache, UnifiedConfig, UnifiedModel
from dsfuse.nn.moe import moe_aux_loss, moe_layers
from dsfuse.report import console, warn
from dsfuse.tasks.diffusion import sample_output

TASK = "unified"
KIND = "unified"
TEXT_TOKENIZER_FILE = "text_tokenizer.json"
PROBE_FILE = "probe.safetensors"
IGNORE = -100
PREVIEW = 8  # images drawn and captions written at each evaluation
PLAUSIBLE = 0.1  # guidance picks among tokens at least this likely, relative to the conditional favourite


@dataclass(kw_only=True)
class UnifiedOptions(runs.TrainOptions):
    """What `train-unified` takes."""

    data: Path
    tokenizer: Path | None = None  # a new run's VQ tokenizer; a resumed run uses its own copy
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    text_vocab: int = 320
    max_text: int = 24
    dim: int = 64
    layers: int = 2
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    shared: int = 1
    expert_hidden: int = 64
    fusion: choices.UnifiedFusion = "early"
    attention: choices.AttentionVariant = "mla"
    caption_dropout: float = 0.1
    image_dropout: float = 0.1
    sample_every: int = 500

    CHANGEABLE = runs.TrainOptions.CHANGEABLE | {"sample_every"}

    def check(self) -> None:
        for name in ("caption_dropout", "image_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"must be in [0, 1), got {getattr(self, name)}", "--" + name.replace("_", "-"))
        if self.text_vocab < 257:
            raise UsageError(f"the byte-level text tokenizer needs at least 257 tokens, got {self.text_vocab}",
                             "--text-vocab")
        if self.top_k > self.experts:
            raise UsageError(f"--top-k {self.top_k} is larger than the number of experts ({self.experts})", "--top-k")

    def model_config(self, text_vocab: int, tokenizer: nn.Module) -> UnifiedConfig:
        return UnifiedConfig(text_vocab=text_vocab, image_vocab=tokenizer.codebook_size,
                             image_tokens=tokenizer.config.grid ** 2, max_text=self.max_text, dim=self.dim,
                             n_layers=self.layers, n_heads=self.heads, experts=self.experts, top_k=self.top_k,
                             shared=self.shared, expert_hidden=self.expert_hidden, fusion=self.fusion,
                             attention=self.attention,
                             code_dim=tokenizer.config.latent_channels)


# --------------------------------------------------------------------------- the loaded model

@dataclass
class UnifiedRun:
    """A trained unified model with the two tokenizers its vocabulary is made of."""

    model: UnifiedModel
    text: Any  # tokenizers.Tokenizer
    vq: nn.Module

    @property
    def config(self) -> UnifiedConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_text(self, text: str, where: object = "--prompt") -> list[int]:
        """A caption's token ids; one longer than the model's caption context is refused."""
        ids = self.text.encode(" ".join(text.split())).ids
        if len(ids) > self.config.max_text:
            raise UsageError(f"the prompt is {len(ids)} tokens; this model reads at most {self.config.max_text}",
                             where)
        return ids

    def decode_text(self, ids: list[int]) -> str:
        return self.text.decode(ids).strip()

    def image_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] -> their codes [B, h*w] in the tokenizer's own numbering."""
        return self.vq.tokenize(images.to(self.device)).flatten(1)


def load_unified(checkpoint: str | Path, device: torch.device) -> UnifiedRun:
    """A `unified` checkpoint with the VQ and text tokenizers beside it (a run dir or its model.safetensors)."""
    path = resolve_checkpoint(checkpoint)
    meta = read_metadata(path)
    if meta.kind != KIND:
        raise UsageError(f"checkpoint holds a {meta.kind!r} model, not a unified model (train one with "
                         "train-unified)", path)
    model, _ = load_checkpoint(path, kind=KIND, device=device)
    vq_path = path.parent / TOKENIZER_FILE
    if not vq_path.is_file():
        raise UsageError(f"unified model without its image tokenizer: {TOKENIZER_FILE} must sit beside it", path)
    vq = load_tokenizer(vq_path, device)
    text = load_bpe(path.parent / TEXT_TOKENIZER_FILE)
    if vq.codebook_size != model.config.image_vocab or text.get_vocab_size() != model.config.text_vocab:
        raise UsageError("the tokenizers beside the model do not match its vocabulary", path)
    return UnifiedRun(model, text, vq)


# --------------------------------------------------------------------------- sequences

def text_to_image(cfg: UnifiedConfig, text: list[int], codes: list[int]) -> tuple[list[int], list[int]]:
    """`caption <image> codes </image>` and its targets (the codes and </image>; the rest ignored)."""
    prefix = [*text, cfg.image_start]
    image = [cfg.text_vocab + c for c in codes] + [cfg.image_end]
    return prefix + image, [IGNORE] * len(prefix) + image


def image_prefix(cfg: UnifiedConfig, codes: list[int]) -> list[int]:
    """`<image> codes </image>`: what a caption follows (no codes: the image-less caption model's prefix)."""
    return [cfg.image_start, *(cfg.text_vocab + c for c in codes), cfg.image_end]


def image_to_text(cfg: UnifiedConfig, codes: list[int], text: list[int]) -> tuple[list[int], list[int]]:
    """`<image> codes </image> caption <eot>` and its targets (the caption and <eot>)."""
    prefix = image_prefix(cfg, codes)
    caption = [*text, cfg.eot]
    return prefix + caption, [IGNORE] * len(prefix) + caption


def pad_sequences(cfg: UnifiedConfig, seqs: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] padded with <pad> (on the left: so that prompts end together) and the mask (True = real)."""
    length = max(map(len, seqs))
    rows = [[cfg.pad] * (length - len(s)) + s if left else s + [cfg.pad] * (length - len(s)) for s in seqs]
    ids = torch.tensor(rows, dtype=torch.long)
    return ids, ids != cfg.pad


def caption_rows(rows: list[list[int]], length: int) -> torch.Tensor:
    """Caption ids [N, length], cut to length or padded with -1 (what `training_batch` reads)."""
    return torch.tensor([r[:length] + [-1] * (length - len(r[:length])) for r in rows], dtype=torch.long)


def training_batch(cfg: UnifiedConfig, codes: torch.Tensor, texts: torch.Tensor, directions: torch.Tensor,
                   dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, mask and next-token targets [B, T] for a batch: each sample in its direction (1: text to
    image), with its condition dropped where `dropped`: the caption of a text-to-image sample, the image of
    an image-to-text one (the unconditional models that guidance contrasts against, each way)."""
    seqs, targets = [], []
    for code_row, text_row, to_image, drop in zip(codes.tolist(), texts.tolist(), directions.tolist(),
                                                  dropped.tolist()):
        text = [t for t in text_row if t >= 0]
        seq, target = (text_to_image(cfg, [] if drop else text, code_row) if to_image
                       else image_to_text(cfg, [] if drop else code_row, text))
        seqs.append(seq)
        targets.append(target)
    ids, mask = pad_sequences(cfg, seqs)
    target_ids = torch.full_like(ids, IGNORE)
    for i, target in enumerate(targets):
        target_ids[i, :len(target)] = torch.tensor(target)
    return ids, mask, target_ids


def next_token_loss(caption_dropout: float, image_dropout: float):
    """The loss of a batch (codes, caption ids): each sample in a random direction, its condition dropped at
    that direction's rate, next-token cross-entropy on its answer (the image or the caption) plus the MoE
    auxiliary losses."""
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        codes, texts = batch
        cfg = unwrap(model).config
        directions = torch.rand(len(codes)) < 0.5
        dropped = torch.rand(len(codes)) < torch.where(directions, caption_dropout, image_dropout)
        ids, mask, targets = (t.to(codes.device) for t in training_batch(cfg, codes.cpu(), texts.cpu(), directions,
                                                                          dropped))
        logits = model(ids, mask)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=IGNORE)
        return loss + moe_aux_loss(model).to(loss.device), {"token_loss": loss.item()}

    return loss_fn


# --------------------------------------------------------------------------- decoding

def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities [B, V] after temperature, top-k (0: all) and nucleus top-p (1: all)."""
    logits = logits.float() / max(temperature, 1e-6)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(-1, keepdim=True)


def guide(logits: torch.Tensor, guidance: float, plausible: float = PLAUSIBLE) -> torch.Tensor:
    """Classifier-free guidance over logits [2B, V] (the conditional rows, then the unconditional ones):
    log-probabilities u + g (c - u), kept to the tokens the conditional model itself finds plausible (at
    least `plausible` times its likeliest token's probability), so that guidance never picks a token
    both models find unlikely."""
    cond, uncond = logits.float().log_softmax(-1).chunk(2)
    guided = uncond + guidance * (cond - uncond)
    return guided.masked_fill(cond < cond.amax(-1, keepdim=True) + math.log(plausible), float("-inf"))


def _prefill(run: UnifiedRun, prompts: list[list[int]], unconditional: list[int], guided: bool
             ) -> tuple[UnifiedCache, torch.Tensor]:
    """A new cache holding the prompts (left-padded) and, with guidance, as many unconditional prompts after
    them; the logits of the last position [B or 2B, V]."""
    seqs = prompts + ([unconditional] * len(prompts) if guided else [])
    ids, mask = (t.to(run.device) for t in pad_sequences(run.config, seqs, left=True))
    cache = run.model.new_cache()
    return cache, run.model(ids, mask, cache)[:, -1]


def _feed(run: UnifiedRun, tokens: torch.Tensor, guided: bool, cache: UnifiedCache) -> torch.Tensor:
    """Feed each prompt's next token [B, 1] (to its unconditional twin too, with guidance); the next logits."""
    step = tokens.repeat(2, 1) if guided else tokens
    return run.model(step, torch.ones_like(step, dtype=torch.bool), cache)[:, -1]


@torch.no_grad()
def draw_codes(run: UnifiedRun, prompts: list[list[int]], *, guidance: float, temperature: float, top_k: int,
               top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Image codes [B, h*w] for caption ids, with classifier-free guidance against the empty caption."""
    cfg, device = run.config, run.device
    guided = guidance != 1.0
    cache, logits = _prefill(run, [[*p, cfg.image_start] for p in prompts], [cfg.image_start], guided)
    codes = []
    for _ in range(cfg.image_tokens):
        image_logits = logits[:, cfg.text_vocab:cfg.image_start]
        if guided:
            image_logits = guide(image_logits, guidance)
        probs = filter_logits(image_logits, temperature, top_k, top_p)
        code = (probs.argmax(-1, keepdim=True) if temperature <= 0
                else torch.multinomial(probs.cpu(), 1, generator=generator).to(device))
        codes.append(code)
        logits = _feed(run, code + cfg.text_vocab, guided, cache)
    return torch.cat(codes, 1)


@torch.no_grad()
def greedy_captions(run: UnifiedRun, codes: torch.Tensor, guidance: float = 1.0) -> list[str]:
    """The most likely caption of each image's codes [B, h*w] (text tokens only, up to <eot>). With
    guidance, each word is `guide`d against the image-less caption model, so that the image outweighs the
    language prior: a colour never seen with a shape in training is still named when the image shows it."""
    cfg, device = run.config, run.device
    guided = guidance != 1.0
    cache, logits = _prefill(run, [image_prefix(cfg, row) for row in codes.tolist()], image_prefix(cfg, []), guided)
    allowed = torch.tensor([*range(cfg.text_vocab), cfg.eot], device=device)
    out: list[list[int]] = [[] for _ in codes]
    done = torch.zeros(len(codes), dtype=torch.bool, device=device)
    for _ in range(cfg.max_text + 1):
        scores = logits[:, allowed]
        token = allowed[(guide(scores, guidance) if guided else scores).argmax(-1)]
        done |= token == cfg.eot
        if bool(done.all()):
            break
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(token[i]))
        logits = _feed(run, token[:, None], guided, cache)
    return [run.decode_text(ids) for ids in out]


@torch.no_grad()
def caption_scores(run: UnifiedRun, codes: torch.Tensor, captions: list[list[int]]) -> torch.Tensor:
    """log p(caption <eot> | image) [B] under the model, for each image's codes [B, h*w] and caption ids."""
    texts = caption_rows(captions, max(map(len, captions)))
    none = torch.zeros(len(captions), dtype=torch.bool)
    ids, mask, target = (t.to(run.device) for t in training_batch(run.config, codes.cpu(), texts, none, none))
    logp = run.model(ids, mask)[:, :-1].float().log_softmax(-1)
    target = target[:, 1:]
    picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return (picked * (target != IGNORE)).sum(1)


def draw_best(run: UnifiedRun, prompts: list[list[int]], *, candidates: int, **sampling: Any) -> torch.Tensor:
    """Image codes [B, h*w] for caption ids: of `candidates` draws per caption (`draw_codes`), the one whose
    caption the model itself finds likeliest given the image (self-reranking, as DALL-E reranks with CLIP)."""
    if candidates == 1:
        return draw_codes(run, prompts, **sampling)
    each = [p for p in prompts for _ in range(candidates)]
    codes = draw_codes(run, each, **sampling)
    best = caption_scores(run, codes, each).view(len(prompts), candidates).argmax(1)
    return codes[best.cpu() + torch.arange(len(prompts)) * candidates]


def decode_images(run: UnifiedRun, codes: torch.Tensor) -> torch.Tensor:
    grid = run.vq.config.grid
    return run.vq.decode_tokens(codes.view(-1, grid, grid)).clamp(-1, 1)


# --------------------------------------------------------------------------- training

def read_training_set(options: UnifiedOptions, quiet: bool) -> tuple[list[Path], list[str]]:
    folder = read_captioned(options.data)
    if folder.uncaptioned:
        warn(f"skipped {len(folder.uncaptioned)} image(s) without a caption, e.g. {folder.uncaptioned[0]}", quiet)
    return folder.images, folder.captions


def encode_images(vq: nn.Module, paths: list[Path], device: torch.device, quiet: bool) -> torch.Tensor:
    """The codes [N, h*w] of every image (resized to the tokenizer's size); an unreadable one is refused."""
    size, codes = vq.config.image_size, []
    for start in range(0, len(paths), 64):
        batch = []
        for path in paths[start:start + 64]:
            try:
                batch.append(load_image(path, size))
            except InputError as e:
                raise UsageError(e.what, e.where) from None
        codes.append(vq.tokenize(torch.stack(batch).to(device)).flatten(1).cpu())
    return torch.cat(codes)


def encode_captions(text: Any, captions: list[str], max_text: int, quiet: bool) -> torch.Tensor:
    """Caption ids [N, max_text] padded with -1; longer captions are cut (with a warning)."""
    rows = [text.encode(c).ids for c in captions]
    cut = sum(len(r) > max_text for r in rows)
    if cut:
        warn(f"{cut} caption(s) longer than {max_text} tokens were cut; raise --max-text to keep them", quiet)
    return caption_rows(rows, max_text)


def start_run(options: UnifiedOptions, out: Path, resume: bool, explicit: Collection[str], device: torch.device
              ) -> tuple[UnifiedOptions, CheckpointMeta | None, nn.Module]:
    """The options, the checkpoint record (on resume) and the VQ tokenizer of the run: the one given for a
    new run, the run's own copy on resume (another one given then is refused)."""
    if not resume:
        if options.tokenizer is None:
            raise UsageError("a new run needs a train-vqvae run for its image tokens", "--tokenizer")
        return options, None, load_tokenizer(options.tokenizer, device)
    options, meta = runs.resume_options(options, out, KIND, explicit)
    vq = load_tokenizer(out / TOKENIZER_FILE, device)
    if options.tokenizer is not None and load_tokenizer(options.tokenizer, device).fingerprint() != vq.fingerprint():
        raise UsageError("the run was trained on another tokenizer; --resume cannot change it", "--tokenizer")
    return options, meta, vq


def train(options: UnifiedOptions, out: Path, *, resume: bool = False, force: bool = False,
          explicit: Collection[str] = (), device: str = "auto", quiet: bool = False) -> tuple[TrainResult, dict]:
    """Train (or continue) a unified run in `out` on a captioned folder and a train-vqvae tokenizer."""
    options.check()
    torch_device = select_device(device)
    options, meta, vq = start_run(options, out, resume, explicit, torch_device)
    paths, captions = read_training_set(options, quiet)
    text = load_bpe(out / TEXT_TOKENIZER_FILE) if resume else train_bpe(captions, options.text_vocab)
    codes = encode_images(vq, paths, torch_device, quiet)
    texts = encode_captions(text, captions, options.max_text, quiet)
    cfg = UnifiedConfig(**meta.config) if meta is not None else options.model_config(text.get_vocab_size(), vq)
    if meta is not None and (cfg.image_vocab != vq.codebook_size or cfg.text_vocab != text.get_vocab_size()):
        raise UsageError("the run's tokenizers do not match its model", out)
    run_dir = runs.prepare_run_dir(out, resume, force)  # only now: bad input leaves no half-made run behind
    if not resume:
        keep_tokenizer(options.tokenizer, run_dir)
        save_bpe(text, run_dir / TEXT_TOKENIZER_FILE)
        write_probe(cfg, codes, texts, run_dir / PROBE_FILE)
    seed_everything(options.seed)
    model = build_model(meta) if meta is not None else UnifiedModel(cfg)
    if meta is None and cfg.code_dim:
        with torch.no_grad():
            model.code_vectors.copy_(vq.quantizer.decode_indices(torch.arange(cfg.image_vocab, device=torch_device)))
    if not quiet:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        console.print(f"train-unified: {len(paths)} captioned images, {cfg.image_tokens} codes each, vocabulary "
                      f"{cfg.vocab} ({cfg.text_vocab} text, {cfg.image_vocab} image, 4 special), {cfg.fusion} "
                      f"fusion, {cfg.attention} attention, {params:.2f}M parameters, on {torch_device}")
    train_cfg = TrainConfig.of(options, quiet=quiet, eval_every=options.sample_every,
                               checkpoint_every=options.sample_every, precision=options.precision or "fp32")
    unified = UnifiedRun(model, text, vq)
    threads = torch.get_num_threads()
    if torch_device.type == "cpu":  # matrices this small lose more to thread hand-offs than they gain (train-moe)
        torch.set_num_threads(1)
    try:
        loss_fn = next_token_loss(options.caption_dropout, options.image_dropout)
        result = fit(model, TensorDataset(codes, texts), loss_fn, train_cfg, run_dir,
                     meta=CheckpointMeta.of(KIND, cfg, options=options.record()), device=torch_device, resume=resume,
                     evaluate=preview_evaluator(unified, codes[:PREVIEW], captions[:PREVIEW], run_dir, options.seed))
    finally:
        torch.set_num_threads(threads)
    return result, {"loss": result.metrics.get("token_loss"), "images": len(paths),
                    "caption_match": result.metrics.get("eval_caption_match"),
                    "samples": str(run_dir / "samples.png"), "captions": str(run_dir / "captions.jsonl"),
                    "checkpoint": str(run_dir / "model.safetensors")}


def write_probe(cfg: UnifiedConfig, codes: torch.Tensor, texts: torch.Tensor, path: Path, n: int = 32) -> None:
    """A fixed batch of training sequences, both directions, for `moe-inspect`."""
    n = min(n, len(codes))
    ids, mask, _ = training_batch(cfg, codes[:n].repeat(2, 1), texts[:n].repeat(2, 1),
                                  torch.arange(2 * n) < n, torch.zeros(2 * n, dtype=torch.bool))
    with atomic_path(path) as tmp:
        save_file({"ids": ids, "mask": mask}, str(tmp))


def preview_evaluator(run: UnifiedRun, codes: torch.Tensor, captions: list[str], run_dir: Path, seed: int):
    """At each evaluation: images drawn for the first captions (samples.png, samples_<step>.png), captions
    of the first images (captions.jsonl, captions_<step>.jsonl), and the share captioned exactly."""
    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        preview = dataclasses.replace(run, model=model)
        prompts = [preview.text.encode(c).ids[:preview.config.max_text] for c in captions]
        generator = torch.Generator().manual_seed(seed)
        drawn = draw_codes(preview, prompts, guidance=3.0, temperature=1.0, top_k=0, top_p=0.9, generator=generator)
        images = decode_images(preview, drawn)
        save_grid(images, run_dir / f"samples_{step:06d}.png")
        save_grid(images, run_dir / "samples.png")
        said = greedy_captions(preview, codes.to(preview.device))
        lines = "".join(json.dumps({"caption": c, "generated": s}) + "\n" for c, s in zip(captions, said))
        write_text(run_dir / f"captions_{step:06d}.jsonl", lines)
        write_text(run_dir / "captions.jsonl", lines)
        return {"caption_match": sum(c == s for c, s in zip(captions, said)) / len(captions)}

    return evaluate


# --------------------------------------------------------------------------- using a run

@dataclass(kw_only=True)
class PromptOptions:
    """What `sample --prompt` takes."""

    prompt: str
    n: int = 8
    guidance: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    candidates: int = 1  # draws per image, the best kept by the model's own caption likelihood
    batch_size: int = 64
    seed: int = 0

    def check(self) -> None:
        if not self.prompt.strip():
            raise UsageError("the prompt is empty", "--prompt")
        if self.temperature < 0:
            raise UsageError(f"must be 0 or more, got {self.temperature}", "--temperature")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"must be in (0, 1], got {self.top_p}", "--top-p")
        if self.top_k < 0:
            raise UsageError(f"must be 0 (all) or more, got {self.top_k}", "--top-k")
        if self.candidates < 1:
            raise UsageError(f"must be 1 or more, got {self.candidates}", "--candidates")


def is_unified(checkpoint: str | Path) -> bool:
    return read_metadata(checkpoint).kind == KIND


def sample_prompt(checkpoint: str | Path, out: Path, options: PromptOptions, *, device: str = "auto",
                  force: bool = False) -> dict[str, Any]:
    """Draw `n` images for the prompt into `out` (a folder: one PNG each plus grid.png; a .png: the grid)."""
    options.check()
    grid_path = sample_output(out, force)
    run = load_unified(checkpoint, select_device(device))
    prompt = run.encode_text(options.prompt)
    seed_everything(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    images = []
    per_batch = max(1, options.batch_size // options.candidates)
    for start in range(0, options.n, per_batch):
        count = min(per_batch, options.n - start)
        codes = draw_best(run, [prompt] * count, candidates=options.candidates, guidance=options.guidance,
                          temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                          generator=generator)
        images.append(decode_images(run, codes))
    images = torch.cat(images)
    files = [] if grid_path == out else [str(save_png(im, out / f"{i:03d}.png")) for i, im in enumerate(images)]
    save_grid(images, grid_path)
    return {"out": str(out), "grid": str(grid_path), "files": files, "n": options.n, "prompt": options.prompt,
            "guidance": options.guidance, "temperature": options.temperature, "top_k": options.top_k,
            "top_p": options.top_p, "candidates": options.candidates}


class Captioner:
    """Captions image files with a unified run (`greedy_captions`, guided against the image-less model)."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", guidance: float = 1.0):
        if guidance < 0:
            raise UsageError(f"must be 0 or more, got {guidance}", "--guidance")
        self.run = load_unified(checkpoint, select_device(device))
        self.guidance = guidance

    def __call__(self, path: Path) -> dict[str, Any]:
        image = load_image(path, self.run.vq.config.image_size)  # InputError: a per-file failure
        return {"caption": greedy_captions(self.run, self.run.image_codes(image[None]), self.guidance)[0]}


# --------------------------------------------------------------------------- inspection and the dataset

@torch.no_grad()
def modality_load(model: UnifiedModel, checkpoint: str | Path) -> list[dict[str, Any]]:
    """Route the run's probe sequences through `model`; per MoE layer, the share of text and of image
    tokens each expert takes, and how far apart the two distributions are (total variation, 0..1)."""
    path = resolve_checkpoint(checkpoint).parent / PROBE_FILE
    if not path.is_file():
        raise UsageError(f"the unified run has no {PROBE_FILE} to route", path)
    try:
        probe = load_file(str(path))
        ids, mask = probe["ids"], probe["mask"].bool()
    except Exception as e:
        raise UsageError(f"unreadable probe ({type(e).__name__})", path) from None
    device = next(model.parameters()).device
    if ids.max() >= model.config.vocab or ids.min() < 0:
        raise UsageError("the probe's token ids do not fit the model's vocabulary", path)
    model(ids.to(device), mask.to(device))
    image = model.config.is_image(ids).flatten().to(device)
    text = (mask.flatten().to(device) & ~image)
    layers = []
    for layer in moe_layers(model):
        expert_ids = layer.last_routing.expert_ids
        shares = {}
        for name, rows in (("text", text), ("image", image)):
            counts = torch.bincount(expert_ids[rows].flatten(), minlength=layer.cfg.n_experts).float()
            shares[name] = counts / counts.sum().clamp_min(1)
        layers.append({"text_share": [round(v, 4) for v in shares["text"].tolist()],
                       "image_share": [round(v, 4) for v in shares["image"].tolist()],
                       "text_tokens": int(text.sum()), "image_tokens": int(image.sum()),
                       "specialisation": round(float((shares["text"] - shares["image"]).abs().sum() / 2), 4)})
    return layers


def make_shapes(out: Path, *, n_train: int, n_heldout: int, size: int, seed: int,
                order: choices.CaptionOrder = "shape-first", force: bool) -> dict[str, Any]:
    """Write the generated captioned set (see data/captioned.py) into OUT/train and OUT/heldout."""
    if n_train < 1 or n_heldout < 0 or size < 16:
        raise UsageError("need --train >= 1, --heldout >= 0 and --size >= 16", "--train/--heldout/--size")
    claim_output_folder(out, force)
    counts = write_captioned_set(out, n_train, n_heldout, size, seed, order)
    return {"out": str(out), **counts, "size": size, "captions": order}
