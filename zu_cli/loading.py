"""Loading a checkpoint for computing: device map, dtype and memory options, checked before
anything is read, and the model and tokenizer placed by accelerate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import CheckpointError, UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_max_memory(text: str | None) -> dict[Any, str] | None:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", "cpu": "60GiB"}``.

    Raises:
        UsageError: malformed text (exit 2).
    """
    if not text:
        return None
    out: dict[Any, str] = {}
    for part in text.split(","):
        key, sep, val = part.strip().partition("=")
        if not sep or not key or not val:
            raise UsageError(f"--max-memory: cannot parse {part!r}", hint='use e.g. "0=20GiB,cpu=60GiB"')
        out[int(key) if key.isdigit() else key] = val
    return out


def _accelerator_type() -> str | None:
    """The name of this machine's accelerator (e.g. the CUDA one), or None without one."""
    import torch

    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return acc.type if acc is not None else None


ACCELERATOR_NAMES = ("gpu", "accelerator", "cuda", "xpu", "mps", "npu", "hpu", "mlu")
DEVICE_MAPS = ("auto", "cpu", "gpu", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(value: str) -> Any:
    """The ``device_map`` argument for ``from_pretrained`` from the ``--device-map`` option.

    Checked before anything is loaded: an accelerator this machine does not have is a usage error.

    Raises:
        UsageError: unknown value, an absent accelerator or an unreadable JSON file (exit 2).
    """
    if value in ("auto", "balanced", "balanced_low_0", "sequential"):
        return value
    if value == "cpu":
        return {"": "cpu"}
    if value in ACCELERATOR_NAMES:
        here = _accelerator_type()
        if here is None or value not in ("gpu", "accelerator", here):
            raise UsageError(f"--device-map {value}: no {value} accelerator on this machine"
                             + (f" (it has {here})" if here else ""), hint="use auto or cpu")
        return {"": 0}  # accelerate reads an integer as the accelerator's index
    if value.endswith(".json"):
        try:
            return json.loads(Path(value).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--device-map {value}: cannot read device map JSON ({exc})") from exc
    raise UsageError(f"--device-map: unknown value {value!r}",
                     hint="auto, cpu, gpu (with an accelerator), balanced, sequential or a FILE.json")


def compute_dtype(value: str, device_map: Any):
    """The torch dtype to compute in. ``auto``: float32 on CPU (bf16 matmuls are slow and coarse there),
    the accelerator's usual bfloat16 otherwise.

    Raises:
        UsageError: unknown value (exit 2).
    """
    import torch

    if value not in DTYPES:
        raise UsageError(f"--dtype: unknown value {value!r}", hint="one of " + ", ".join(DTYPES))
    if value != "auto":
        return getattr(torch, value)
    on_cpu = device_map == {"": "cpu"} or not torch.accelerator.is_available()
    return torch.float32 if on_cpu else torch.bfloat16


def check_load_options(device_map: str, dtype: str, max_memory: str | None = None) -> None:
    """Every loading option checked at once, before anything is read (``load_model`` uses the same parsers).

    Raises:
        UsageError: a bad value (exit 2).
    """
    compute_dtype(dtype, resolve_device_map(device_map))
    parse_max_memory(max_memory)


def load_model(ckpt: Checkpoint, device_map: str = "auto", max_memory: str | None = None,
               offload_dir: str | None = None, dtype: str = "auto"):
    """Load model and tokenizer for computing, placed by accelerate.

    Args:
        ckpt: an opened Checkpoint.
        device_map: ``auto|cpu|cuda|balanced|FILE.json``.
        max_memory: e.g. ``"0=20GiB,cpu=60GiB"``.
        offload_dir: folder for weights offloaded to disk.
        dtype: compute dtype.

    Returns:
        (model in eval mode with gradients off, tokenizer).

    Raises:
        CheckpointError: transformers could not load the weights or tokenizer (exit 3).
        UsageError: bad option values (exit 2).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .hooks import contiguous_head
    hf_logging.disable_progress_bar()  # zu shows its own progress; tqdm bars would interleave on stderr
    dm = resolve_device_map(device_map)
    kwargs: dict[str, Any] = {"dtype": compute_dtype(dtype, dm), "device_map": dm}
    mm = parse_max_memory(max_memory)
    if mm:
        kwargs["max_memory"] = mm
    if offload_dir:
        kwargs["offload_folder"] = offload_dir
    try:
        tok = AutoTokenizer.from_pretrained(ckpt.path)
    except Exception as exc:
        raise CheckpointError(f"{ckpt.path}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, **kwargs)
    except Exception as exc:
        raise CheckpointError(f"{ckpt.path}: cannot load the model ({str(exc).splitlines()[0]})") from exc
    model.eval()
    model.requires_grad_(False)
    contiguous_head(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
