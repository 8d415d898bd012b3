"""Token files: image token grids with the fingerprint of the tokenizer that made them, so tokens are
never decoded by a tokenizer that gives their ids another meaning.

Two formats, chosen by suffix:
- `.jsonl`: one `{"file", "grid": [h, w], "tokens": [...], "tokenizer", "codebook_size"}` per line
  (exactly what `tokenize-image --json` prints, so stdout can be saved and decoded later);
- `.safetensors`: one int32 tensor `tokens` [N, h, w]; file names, tokenizer and codebook size in the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsfuse.errors import UsageError
from dsfuse.io import atomic_path, write_text

TOKEN_SUFFIXES = (".jsonl", ".safetensors")


@dataclass
class TokenGrid:
    file: str  # the image the tokens came from
    tokens: torch.Tensor  # [h, w] ints
    tokenizer: str  # fingerprint of the tokenizer (VQVAE.fingerprint())
    codebook_size: int

    def to_json(self) -> dict:
        return {"file": self.file, "grid": list(self.tokens.shape), "tokens": self.tokens.flatten().tolist(),
                "tokenizer": self.tokenizer, "codebook_size": self.codebook_size}


def check_token_path(path: Path) -> Path:
    if path.suffix.lower() not in TOKEN_SUFFIXES:
        raise UsageError(f"a tokens file ends in {' or '.join(TOKEN_SUFFIXES)}", path)
    return path


def write_tokens(path: str | Path, grids: list[TokenGrid]) -> Path:
    """Write all grids to one file, atomically; every grid must come from the same tokenizer."""
    path = check_token_path(Path(path))
    if path.suffix.lower() == ".jsonl":
        write_text(path, "".join(json.dumps(g.to_json()) + "\n" for g in grids))
        return path
    if not grids:
        raise UsageError("no token grids to write", path)
    if len({(g.tokenizer, tuple(g.tokens.shape)) for g in grids}) > 1:
        raise UsageError("a .safetensors tokens file holds grids of one tokenizer and one size; use .jsonl", path)
    metadata = {"format": "dsfuse-tokens", "tokenizer": grids[0].tokenizer,
                "codebook_size": str(grids[0].codebook_size), "files": json.dumps([g.file for g in grids])}
    with atomic_path(path) as tmp:
        save_file({"tokens": torch.stack([g.tokens for g in grids]).to(torch.int32).contiguous()}, str(tmp),
                  metadata=metadata)
    return path


def read_tokens(path: str | Path) -> list[TokenGrid]:
    """All grids of a tokens file; a file that is not one is a UsageError naming it."""
    path = check_token_path(Path(path))
    if not path.is_file():
        raise UsageError("tokens file not found", path)
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "dsfuse-tokens" or "tokens" not in f.keys():
                raise UsageError("not a dsfuse tokens file (no tokens tensor or metadata)", path)
            tokens = f.get_tensor("tokens")
        files = json.loads(meta["files"])
        codebook_size = int(meta["codebook_size"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UsageError(f"not a readable tokens file ({type(e).__name__})", path) from None
    if tokens.ndim != 3 or len(files) != len(tokens):
        raise UsageError("tokens tensor is not [N, h, w] with one file name per grid", path)
    return [TokenGrid(name, grid.long(), meta["tokenizer"], codebook_size) for name, grid in zip(files, tokens)]


def _read_jsonl(path: Path) -> list[TokenGrid]:
    grids = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            h, w = record["grid"]
            grids.append(TokenGrid(str(record["file"]), torch.tensor(record["tokens"], dtype=torch.long).reshape(h, w),
                                   str(record["tokenizer"]), int(record["codebook_size"])))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UsageError(f"line {number} is not a token record ({type(e).__name__})", path) from None
    if not grids:
        raise UsageError("tokens file holds no token grids", path)
    return grids
