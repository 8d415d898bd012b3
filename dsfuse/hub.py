"""Where a model named on the command line lives: a local folder as it is, or a Hugging Face Hub id
fetched (config, safetensors, tokenizer) into the Hub's standard cache with its progress bars."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dsfuse.errors import UsageError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json"]


def model_folder(name: str, quiet: bool = False) -> Path:
    """The folder of model `name`: a local folder, or a Hub id downloaded (or found in the cache)."""
    path = Path(name).expanduser()
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
        return Path(snapshot_download(name, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
               else "the Hub cannot be reached")
        raise UsageError(f"model {name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: "
                         "download it once online, or give a local folder") from None
    except RepositoryNotFoundError:
        raise UsageError("no such model on the Hugging Face Hub (or it is private)", name) from None
    except HfHubHTTPError as e:
        raise UsageError(f"the Hugging Face Hub refused the download ({str(e).splitlines()[0][:120]})", name) from None
