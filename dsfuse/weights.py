"""The one resolver of pretrained weights: an explicit file; else the standard cache (torch hub's
`$TORCH_HOME/hub/checkpoints`, or the Hugging Face cache for whole model folders); else a download into
that cache, when online.

A download shows a progress bar, is checked against the expected hash when there is one (torchvision's
convention: the file name ends in `-<first hex digits of its SHA-256>.pth`) and is written atomically,
so an interrupted transfer leaves nothing behind. A cached file is checked the same way: a corrupt one
is refused with a note to delete it. `DSFUSE_OFFLINE=1` (or `HF_HUB_OFFLINE=1`) forbids downloads:
a missing file is then one line naming the file and the folder to put it in.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dsfuse.errors import UsageError
from dsfuse.io import atomic_path

OFFLINE_VARIABLES = ("DSFUSE_OFFLINE", "HF_HUB_OFFLINE")
CHUNK = 1 << 20


def offline() -> bool:
    """True when the environment forbids downloads."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def torch_cache() -> Path:
    """Where torchvision and torchaudio keep downloaded weights: torch hub's folder, `checkpoints/`."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightsFile:
    """A weights file published at `url`; `hash_prefix` (default: from the file name) is the start of its SHA-256."""

    url: str
    hash_prefix: str | None = None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def expected_hash(self) -> str | None:
        if self.hash_prefix is not None:
            return self.hash_prefix
        from torch.hub import HASH_REGEX

        found = HASH_REGEX.search(self.name)
        return found.group(1) if found and found.group(1) else None

    def cached(self) -> Path:
        return torch_cache() / self.name


def resolve(weights: WeightsFile, explicit: Path | None = None, *, option: str, quiet: bool = False) -> Path:
    """The local file of `weights`: `explicit` when given (taken as the user's, no hash check); else the
    cached file (verified); else downloaded into the cache (verified, atomic). Refusals name `option`."""
    if explicit is not None:
        return explicit_file(explicit)
    path = weights.cached()
    if path.is_file():
        check_hash(path, weights.expected_hash, cached=True)
        return path
    if offline():
        raise UsageError(f"pretrained weights not found and downloads are off ({'/'.join(OFFLINE_VARIABLES)}): "
                         f"put {weights.name} (from {weights.url}) in {path.parent}", option)
    download(weights, path, quiet=quiet)
    return path


def explicit_file(path: Path) -> Path:
    """A weights file the user named: it must exist; it is theirs, so no hash is expected of it."""
    if not Path(path).is_file():
        raise UsageError("weights file not found", path)
    return Path(path)


def check_hash(path: Path, expected: str | None, cached: bool) -> None:
    """Refuse `path` when its SHA-256 does not start with `expected` (nothing to check when None)."""
    if expected is None:
        return
    actual = sha256_of(path)
    if not actual.startswith(expected):
        advice = "delete it and run again to download it afresh" if cached else "the download was refused"
        raise UsageError(f"weights file is corrupt: its SHA-256 starts {actual[:len(expected)]}, expected "
                         f"{expected}; {advice}", path)


def download(weights: WeightsFile, path: Path, quiet: bool = False) -> None:
    """Fetch `weights.url` into `path` through a temporary file, verified before it takes the name."""
    where = f"{weights.url}; or put {weights.name} in {path.parent}"
    try:
        with atomic_path(path) as tmp, urllib.request.urlopen(weights.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=weights.name,
                                              disable=quiet, leave=False, file=sys.stderr) as bar:
                while block := response.read(CHUNK):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
            if total is not None and received != total:
                raise UsageError(f"download cut short ({received} of {total} bytes)", where)
            check_hash(tmp, weights.expected_hash, cached=False)
    except UsageError:
        raise
    except urllib.error.HTTPError as e:
        raise UsageError(f"cannot download weights (HTTP {e.code})", where) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UsageError(f"cannot download weights ({type(e).__name__}: {reason})", where) from None
    except Exception as e:  # http.client.IncompleteRead and the like: the transfer broke
        raise UsageError(f"download failed ({type(e).__name__})", where) from None


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json"]


def model_folder(name: str, quiet: bool = False) -> Path:
    """The folder of model `name`: a local folder as it is; else a Hugging Face Hub id, found in the Hub's
    cache or (when online) downloaded into it by huggingface_hub, which verifies each file."""
    path = Path(name)
    if path.exists() or not HUB_ID.fullmatch(name):
        if not path.exists():
            raise UsageError("no such model folder (nor a Hugging Face Hub id, owner/name)", name)
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars

    if quiet:
        disable_progress_bars()
    try:
        return Path(snapshot_download(name, allow_patterns=MODEL_FILES, local_files_only=offline()))
    except LocalEntryNotFoundError:
        why = (f"downloads are off ({'/'.join(OFFLINE_VARIABLES)})" if offline() else "the Hub cannot be reached")
        raise UsageError(f"model {name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: "
                         "download it once online, or give a local folder") from None
    except RepositoryNotFoundError:
        raise UsageError("no such model on the Hugging Face Hub (or it is private)", name) from None
    except HfHubHTTPError as e:
        raise UsageError(f"the Hugging Face Hub refused the download ({str(e).splitlines()[0][:120]})", name) from None


def load_state_dict(path: Path) -> dict[str, Any]:
    """A .pth of plain tensors (weights_only refuses anything else); an unreadable one is refused in one line."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read pretrained weights ({type(e).__name__}); if it is a cached download, "
                         "delete it and run again", path) from None

