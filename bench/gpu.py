"""Speed at scale: `zu unlearn` on a model of Llama-3.2-3B's or Llama-3.1-8B's exact shapes, with
random weights (shapes decide speed; no hub is reachable), synthetic requests, one device.

    python bench/gpu.py --shape llama-3.2-3b --requests 50,1000 --variant both      # on a GPU
    python bench/gpu.py --shape tiny --requests 3 --variant both --device cpu       # the test suite

For each request count and variant (closed form, --multi): a cold run (statistics sampled from a
bounded synthetic corpus) and a warm one (statistics cached). Prints one JSON line per run: stage
times, requests per second, peak device memory; then a summary line.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Llama-3.2-3B and Llama-3.1-8B as their config.json describe them (the shapes only).
SHAPES = {
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                         max_position_embeddings=131072, head_dim=128),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                         max_position_embeddings=131072, head_dim=128),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=256),
}


def build(shape: str, dtype: str, device: str, root: Path) -> Path:
    """A checkpoint folder: random weights of ``shape`` and a word-level tokenizer of its vocabulary size."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = tf.LlamaConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         torch_dtype=getattr(torch, dtype))
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=getattr(torch, dtype))
    model.save_pretrained(root)
    del model
    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, cfg.vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                               pad_token="</s>").save_pretrained(root)
    return root


def synthetic_requests(n: int, vocab: int, path: Path, seed: int = 0) -> Path:
    """``n`` requests of 8-12 word prompts whose last two words are the subject, one-word targets."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [f"w{rng.randrange(2, vocab)}" for _ in range(rng.randint(8, 12))]
        rows.append({"id": f"s{i}", "prompt": " ".join(words), "subject": " ".join(words[-2:]),
                     "target": f"w{rng.randrange(2, vocab)}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def synthetic_corpus(vocab: int, path: Path, lines: int = 256, words: int = 64, seed: int = 1) -> Path:
    """A bounded text for the general statistics (cold runs): ``lines`` paragraphs of random words."""
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(f"w{rng.randrange(2, vocab)}" for _ in range(words))
                                for _ in range(lines)))
    return path


def run_one(model: Path, req: Path, corpus: Path, multi: bool, device: str, dtype: str, out: Path) -> dict:
    """One ``zu unlearn`` through the library: stage times, requests per second, peak device memory."""
    import torch

    from zu_cli.arch import num_layers
    from zu_cli.windows import default_window, multi_window
    from zu_cli.checkpoint import open_checkpoint
    from zu_cli.config import load_config
    from zu_cli.console import silent
    from zu_cli.keys import ephemeral
    from zu_cli.pipeline import UnlearnOptions, run_unlearn

    ckpt = open_checkpoint(model)
    window = default_window(num_layers(ckpt.spec, ckpt.config))
    layers = multi_window(window, 0) if multi else window
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = run_unlearn(UnlearnOptions(model=model, forget=req, out=out, layers=",".join(map(str, layers)),
                                     multi=multi, stats_corpus=str(corpus), device_map=device, dtype=dtype,
                                     force=True, signer=ephemeral(), calibrate=False, card=False),
                      load_config(None), silent())
    wall = time.perf_counter() - t0
    n = len(res.requests)
    return {"requests": n, "variant": res.variant, "layers": res.layers, "wall_s": round(wall, 1),
            "stages_s": res.timings, "requests_per_s": round(n / wall, 3),
            "edit_requests_per_s": round(n / max(res.timings["targets"] + res.timings["solve"], 1e-9), 3),
            "peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-3b")
    ap.add_argument("--requests", default="50,1000")
    ap.add_argument("--variant", choices=("closed", "multi", "both"), default="both")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu by default")
    ap.add_argument("--workdir", help="where the checkpoint and outputs go (default: a temporary folder)")
    a = ap.parse_args()

    import os

    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
    with tempfile.TemporaryDirectory(prefix="zu-gpu-bench-", dir=a.workdir) as tmp:
        work = Path(tmp)
        os.environ["ZU_CACHE_DIR"] = str(work / "cache")  # cold means cold: a cache of this run only
        t0 = time.perf_counter()
        model = build(a.shape, dtype, device, work / "model")
        vocab = SHAPES[a.shape]["vocab_size"]
        corpus = synthetic_corpus(vocab, work / "corpus.txt")
        print(json.dumps({"shape": a.shape, "device": device, "dtype": dtype,
                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                          "build_s": round(time.perf_counter() - t0, 1)}), flush=True)
        variants = {"closed": [False], "multi": [True], "both": [False, True]}[a.variant]
        rows = []
        for n in (int(x) for x in a.requests.split(",")):
            req = synthetic_requests(n, vocab, work / f"req{n}.jsonl")
            for multi in variants:
                for temp in ("cold", "warm"):  # the cold run fills the statistics cache the warm one reads
                    if temp == "cold":
                        shutil.rmtree(work / "cache", ignore_errors=True)
                    row = {"shape": a.shape, "stats": temp,
                           **run_one(model, req, corpus, multi, device, dtype, work / "out")}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
        print(json.dumps({"summary": True, "runs": len(rows),
                          "warm_wall_s": {f"{r['variant']}@{r['requests']}": r["wall_s"] for r in rows
                                          if r["stats"] == "warm"}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
