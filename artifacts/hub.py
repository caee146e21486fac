"""Model folders on the Hugging Face Hub: ``hf-hub:OWNER/REPO[@revision]`` -> a local folder in huggingface_hub's cache.

Every script and the Python API pass their ``--checkpoint`` through :func:`resolve_hub_path`; a Hub folder holds the
same files as a local one (PyTorch checkpoint, ``model.safetensors`` or an exported ``model.onnx``, with
``config.json`` and ``class_mapping.csv``). Offline (``HF_HUB_OFFLINE=1`` or no network) a folder already in the
cache is used; one that is not is a one-line error. Torch-free.
"""

import os
from pathlib import Path

from errors import UserError

HUB_PREFIX = "hf-hub:"


def parse_hub_id(location: str) -> tuple[str, str | None]:
    """``("OWNER/REPO", revision or None)`` of ``hf-hub:OWNER/REPO[@revision]``."""
    repo_id, _, revision = location[len(HUB_PREFIX):].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")) or (revision == "" and "@" in location):
        raise UserError(f"{location!r} is not a Hub model id; write hf-hub:OWNER/REPO or hf-hub:OWNER/REPO@REVISION")
    return repo_id, revision or None


def resolve_hub_path(location: str | os.PathLike) -> Path:
    """The local path of ``location``: a Hub id is downloaded (or found) in the huggingface_hub cache, anything else
    is returned as a :class:`~pathlib.Path`."""
    text = os.fspath(location)
    if not text.startswith(HUB_PREFIX):
        return Path(text)
    repo_id, revision = parse_hub_id(text)
    from huggingface_hub import snapshot_download  # imported here: only Hub ids need it
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision))
    except LocalEntryNotFoundError:
        raise UserError(f"{text} is not in the Hugging Face cache and the Hub cannot be reached (offline); "
                        "run once with network access, or pass a local model folder") from None
    except RepositoryNotFoundError:
        raise UserError(f"{text}: no such model repository on the Hub (or it is private: log in with "
                        "`hf auth login`)") from None
    except (HfHubHTTPError, OSError) as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"{text} could not be downloaded ({detail}); check the id and revision") from None
