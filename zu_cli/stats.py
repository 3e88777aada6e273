"""General-knowledge statistics (design §2.6, §2.8): G = E[v v^T] and E[k k^T] per edited layer, one pass, cached."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .config import Hyper
from .console import Output, silent
from .errors import InputFileError
from .hooks import TraceDict
from .text import as_tokens, input_device, left_pad, sample, sample_steps

KEY_SUFFIX = ":kkT"  # names E[k k^T] next to a module's G in the cache and in second_moments' result
SEED_WORDS = ["The", "In", "A", "It", "He", "She", "They", "This", "We", "When", "After", "Many"]


def cache_dir() -> Path:
    """``ZU_CACHE_DIR`` or ``~/.cache/zu``."""
    return Path(os.environ.get("ZU_CACHE_DIR") or Path.home() / ".cache" / "zu")


def read_corpus(path: str | Path) -> tuple[list[str], str]:
    """Texts of a corpus file (.txt: one text per blank-line separated paragraph; .jsonl: a ``text``
    field per line) or of a folder of such files.

    Returns:
        (texts, sha256 digest of the contents).

    Raises:
        InputFileError: missing, unreadable or empty corpus, or a jsonl line without ``text`` (exit 2).
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise InputFileError(f"{path}: stats corpus not found (a .txt/.jsonl file or a folder of them)")
    texts, h = [], hashlib.sha256()
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(f"{f}: cannot read stats corpus ({exc})") from exc
        h.update(raw.encode())
        if f.suffix == ".jsonl":
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError) as exc:
                        raise InputFileError(f"{f}:{n}: field 'text': missing or malformed line") from exc
        else:
            texts.extend(p.strip() for p in raw.split("\n\n") if p.strip())
    if not texts:
        raise InputFileError(f"{path}: stats corpus is empty")
    return texts, h.hexdigest()


def samples_digest(n_samples: int, length: int, seed: int) -> str:
    """Digest naming the model-sampled corpus (its text depends only on the model and these)."""
    # v2: sampled 64 at a time (text.sample), which draws other texts than one batch did;
    # v3: moments taken during the sampling (KV-cached passes) instead of a second pass
    return hashlib.sha256(f"model-samples-v3:{n_samples}x{length}:seed{seed}".encode()).hexdigest()


def corpus_tokens(model, tok, corpus: str | None, n_samples: int, length: int, max_tokens: int,
                  seed: int, out: Output | None = None) -> tuple[list[list[int]], str]:
    """Token sequences for the statistics and a digest naming them.

    Without a corpus, text is sampled from the model itself (deterministic for ``seed``), so no
    download is needed; with one, texts are cut into ``length``-token chunks up to ``max_tokens``.
    """
    if corpus is None:
        gen = torch.Generator().manual_seed(seed)
        seeds = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(n_samples)]
        with (out or silent()).progress("sampling text for the statistics", sample_steps(n_samples, length)) as adv:
            return sample(model, tok, seeds, length, gen, advance=adv), samples_digest(n_samples, length, seed)
    texts, digest = read_corpus(corpus)
    seqs, total = [], 0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - 1, length):
            chunk = ids[i:i + length]
            if len(chunk) > 1 and total < max_tokens:
                seqs.append(chunk)
                total += len(chunk)
    return seqs, hashlib.sha256(f"{digest}:{length}:{max_tokens}".encode()).hexdigest()


@torch.no_grad()
def second_moments(model, seqs: list[list[int]], modules: list[str], biases: dict[str, torch.Tensor | None],
                   pad_id: int, out: Output, batch_size: int = 16,
                   key_modules: tuple[str, ...] = (), label: str = "statistics",
                   select: list[list[bool]] | None = None) -> dict[str, torch.Tensor]:
    """G = E[v v^T] of each module's output v (bias removed), over every real (or selected) token, in one pass;
    also E[k k^T] of the input k of the modules in ``key_modules`` (for --multi).

    Args:
        model: the causal LM.
        seqs: token sequences.
        modules: down-projection module names, ascending depth (the pass stops after the last).
        biases: module name -> its bias (subtracted from v) or None.
        pad_id: padding id.
        out: progress output.
        batch_size: sequences per forward pass.
        key_modules: modules (among ``modules``) whose input moments are wanted too.
        label: progress bar label.
        select: per sequence, which of its tokens count (default: all of them).

    Returns:
        module name -> G (d_model, d_model), and ``name + KEY_SUFFIX`` -> E[k k^T] (d_ff, d_ff);
        float64 on CPU.
    """
    dev = input_device(model)
    acc = _Moments(modules, biases, key_modules)
    with out.progress(label, len(seqs)) as advance:
        for b in range(0, len(seqs), batch_size):
            chunk = seqs[b:b + batch_size]
            batch = left_pad(chunk, pad_id, dev)
            with TraceDict(model, modules, retain_input=bool(key_modules), stop=True) as td:
                model(**batch.kwargs())
            real = batch.mask.bool().cpu()  # (B, T); rows are left-padded
            if select is not None:
                for i, sel in enumerate(select[b:b + batch_size]):
                    real[i, int(batch.offset[i]):] &= torch.tensor(sel, dtype=torch.bool)
            acc.add(td, real)
            advance(len(chunk))
    return acc.means()  # no token left (one-token prompts): zeros


class _Moments:
    """Running sums of v v^T (bias removed) and k k^T over the real tokens of successive forward passes."""

    def __init__(self, modules: list[str], biases: dict[str, torch.Tensor | None], key_modules: tuple[str, ...]):
        self.modules, self.biases, self.key_modules = modules, biases, key_modules
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, td, real: torch.Tensor) -> None:
        """Accumulate the traced activations of one pass; ``real`` (B, S) marks the tokens that count."""
        real = real.cpu()
        for name in self.modules:
            v = as_tokens(td[name].output, *real.shape).to(device="cpu", dtype=torch.float64)[real]  # (tokens, d)
            if self.biases.get(name) is not None:
                v = v - self.biases[name].to(torch.float64).cpu()
            self.sums[name] = self.sums.get(name, 0) + v.T @ v
            if name in self.key_modules:
                k = as_tokens(td[name].input, *real.shape).to(device="cpu", dtype=torch.float64)[real]  # (tokens, f)
                self.sums[name + KEY_SUFFIX] = self.sums.get(name + KEY_SUFFIX, 0) + k.T @ k
        self.count += int(real.sum())

    def means(self) -> dict[str, torch.Tensor]:
        return {k: s / max(self.count, 1) for k, s in self.sums.items()}


@torch.no_grad()
def sampled_moments(model, tok, hp: Hyper, modules: list[str], biases: dict[str, torch.Tensor | None],
                    key_modules: tuple[str, ...], out: Output) -> dict[str, torch.Tensor]:
    """``second_moments`` over the texts the model samples (``corpus_tokens`` without a corpus), taken
    while they are generated: every token passes through the model once, not twice.

    Returns:
        As ``second_moments``.
    """
    acc = _Moments(modules, biases, key_modules)
    gen = torch.Generator().manual_seed(hp.seed)
    seeds = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(hp.stats_samples)]
    steps = sample_steps(hp.stats_samples, hp.stats_len)
    with TraceDict(model, modules, retain_input=bool(key_modules)) as td, \
            out.progress("sampling text for the statistics", steps) as advance:
        sample(model, tok, seeds, hp.stats_len, gen, advance=advance, on_forward=lambda real: acc.add(td, real))
    return acc.means()


def stats_key(source_digest: str, module: str, corpus_digest: str) -> str:
    """Cache key: the source weights' digest, the module, the corpus and its settings."""
    return hashlib.sha256(f"v1:{source_digest}:{module}:{corpus_digest}".encode()).hexdigest()[:32]


def read_entry(kind: str, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors of cache entry ``ZU_CACHE_DIR/kind/key.safetensors``, or None if absent or damaged
    (a damaged entry is recomputed, not fatal)."""
    from safetensors.torch import load_file

    f = cache_dir() / kind / f"{key}.safetensors"
    if not f.is_file():
        return None
    try:
        return load_file(f)
    except Exception:
        return None


def write_entry(kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write cache entry ``ZU_CACHE_DIR/kind/key.safetensors`` atomically."""
    from safetensors.torch import save_file

    d = cache_dir() / kind
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{key}.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, d / f"{key}.safetensors")


def load_cached(key: str) -> torch.Tensor | None:
    """A cached G or None."""
    entry = read_entry("stats", key)
    return None if entry is None or "G" not in entry else entry["G"]


def store_cached(key: str, g: torch.Tensor) -> None:
    """Write G to the cache atomically."""
    write_entry("stats", key, {"G": g})


def cached_moments(source: str, digest: str, names: dict[int, str], keys: bool,
                   compute: Callable[[list[int], tuple[str, ...]], dict[str, torch.Tensor]]
                   ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Second moments per layer from the cache, computing (one call) and storing whatever is missing.

    Args:
        source: digest of the source weights.
        digest: digest naming the token set and its settings.
        names: layer -> down-projection module name.
        keys: E[k k^T] is wanted too.
        compute: (layers to compute, modules whose key moments are missing) -> second_moments' result.

    Returns:
        (layer -> G, layer -> E[k k^T] or empty unless ``keys``).
    """
    wanted = list(names.values()) + ([n + KEY_SUFFIX for n in names.values()] if keys else [])
    cache_keys = {w: stats_key(source, w, digest) for w in wanted}
    found = {w: c for w in wanted if (c := load_cached(cache_keys[w])) is not None}
    missing = [w for w in wanted if w not in found]
    if missing:
        # One pass computes every missing statistic; G comes free with E[k k^T] (same hook).
        need = sorted({l for l, n in names.items() if n in missing or n + KEY_SUFFIX in missing})
        fresh = compute(need, tuple(names[l] for l in need if names[l] + KEY_SUFFIX in missing))
        for w in missing:
            found[w] = fresh[w]
            store_cached(cache_keys[w], fresh[w])
    return ({l: found[n] for l, n in names.items()},
            {l: found[n + KEY_SUFFIX] for l, n in names.items()} if keys else {})


def collect_stats(model, tok, spec, layers, biases, hp: Hyper, corpus: str | None, source: str,
                  out: Output, keys: bool = False) -> tuple[dict[int, Any], dict[int, Any], str]:
    """G per edited layer (and E[k k^T] when ``keys``) from the cache, or from one pass over the
    corpus for everything missing.

    Returns:
        (layer -> G, layer -> E[k k^T] (empty unless ``keys``), digest naming the corpus and its settings).
    """
    seqs = None
    if corpus is not None:  # a file's digest is only known once read (cheap next to a model pass)
        seqs, corpus_digest = corpus_tokens(model, tok, corpus, hp.stats_samples, hp.stats_len,
                                            hp.stats_max_tokens, hp.seed)
    else:
        corpus_digest = samples_digest(hp.stats_samples, hp.stats_len, hp.seed)
    names = {l: spec.down_proj_module(l) for l in layers}

    def compute(need: list[int], key_mods: tuple[str, ...]) -> dict[str, torch.Tensor]:
        mods, bias = [names[l] for l in need], {names[l]: biases[l] for l in need}
        if seqs is None:  # model samples: the moments are taken while they are generated, in one pass
            return sampled_moments(model, tok, hp, mods, bias, key_mods, out)
        return second_moments(model, seqs, mods, bias, tok.pad_token_id, out, key_modules=key_mods)

    g, kk = cached_moments(source, corpus_digest, names, keys, compute)
    return g, kk, corpus_digest
