"""Hugging Face Hub model ids (``org/name[@revision]``) through huggingface_hub's own cache.

A model the user already has in the HF cache (``HF_HOME``, ``HF_HUB_CACHE``) just works, offline
too (``HF_HUB_OFFLINE=1``); otherwise huggingface_hub downloads it, with the token it finds
(``HF_TOKEN``, ``hf auth login``). zu never writes into the cache's snapshot: the output is
always a new directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

# org/name with an optional @revision (branch, tag or commit); a local path wins when it exists.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
# Weights zu cannot use are not downloaded: a repo may hold the same model in five formats.
IGNORE = ["*.bin", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf", "*.ot", "*.tflite",
          "*.mlmodel", "*.ckpt", "original/*", "onnx/*", "coreml/*"]


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` reads as ``org/name[@revision]`` and names no local path."""
    return bool(HUB_ID.match(text)) and not Path(text).exists()


def resolve(model: str) -> tuple[Path, dict[str, str]]:
    """The local snapshot directory of a hub model id, downloaded unless cached (or offline).

    Args:
        model: ``org/name`` or ``org/name@revision``.

    Returns:
        (snapshot directory, ``{"repo_id", "revision"}`` with the revision resolved to its commit).

    Raises:
        CheckpointError: offline and not cached, unknown repo or revision, gated repo, network
            failure (exit 3), in one line.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import disable_progress_bars

    repo_id, _, revision = model.partition("@")
    disable_progress_bars()  # zu shows its own progress; tqdm bars would interleave on stderr
    try:
        snap = Path(snapshot_download(repo_id, revision=revision or None, ignore_patterns=IGNORE))
    except hf_errors.LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise CheckpointError(f"{model}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}",
                              hint=f"download it once with `hf download {repo_id}`, or pass a local directory"
                              ) from exc
    except hf_errors.GatedRepoError as exc:
        raise CheckpointError(f"{model}: gated repository; accept its terms on the hub and log in",
                              hint="`hf auth login` or set HF_TOKEN") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise CheckpointError(f"{model}: no such model on the hub (or it is private)",
                              hint="check the id, or log in with `hf auth login`") from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise CheckpointError(f"{model}: no revision {revision!r} in {repo_id}") from exc
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{model}: cannot fetch from the hub ({str(exc).splitlines()[0]})") from exc
    return snap, {"repo_id": repo_id, "revision": snap.name}
