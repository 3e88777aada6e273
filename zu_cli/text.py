"""Batching and sampling helpers shared by the stages that run the model on text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UsageError


def input_device(model: torch.nn.Module) -> torch.device:
    """Device to put input ids on (accelerate's hooks move activations between devices after that)."""
    dev = model.get_input_embeddings().weight.device
    return torch.device("cpu") if dev.type == "meta" else dev


@dataclass
class Batch:
    """Left-padded token batch.

    Attributes:
        ids, mask, pos: (B, S) input ids, attention mask, position ids (0 at each row's first real token).
        offset: (B,) number of pad tokens on the left of each row (add to an unpadded index).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    offset: torch.Tensor

    def kwargs(self) -> dict:
        """Arguments for ``model(**batch.kwargs())``."""
        return {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.pos}


def as_tokens(x: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """View an activation as (batch, seq, dim): some models (OPT) run their MLP on (batch*seq, dim)."""
    return x.reshape(batch, seq, x.shape[-1])


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> Batch:
    """Left-pad token lists so every row ends at the last column (where the next token is predicted).

    Args:
        seqs: token id lists (non-empty).
        pad_id: padding id.
        device: where the tensors go.
    """
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, n - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    offset = torch.tensor([n - len(s) for s in seqs], dtype=torch.long)
    return Batch(ids.to(device), mask.to(device), pos.to(device), offset.to(device))


def encode(tok, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees a prompt (the tokenizer's own special tokens)."""
    return tok(text)["input_ids"]


def encode_target(tok, text: str) -> list[int]:
    """Token ids of an answer continuing a prompt: ``" " + text``, no special tokens (ROME convention)."""
    return tok(" " + text.lstrip(), add_special_tokens=False)["input_ids"]


def subject_positions(tok, text: str, subject: str) -> list[int]:
    """Indices of the tokens of ``encode(tok, text)`` that overlap the subject's characters."""
    start = text.rindex(subject)
    end = start + len(subject)
    try:
        offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizer: count tokens of the prefixes
        first, last = len(encode(tok, text[:start])), len(encode(tok, text[:end])) - 1
        return list(range(min(first, last), last + 1))
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which this transformers version passes (and returns) the KV cache:
    ``cache`` (5.x, where ``past_key_values`` is deprecated and warns) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample(model: torch.nn.Module, tok, seeds: list[str], n_tokens: int,
           generator: torch.Generator | list[torch.Generator], top_k: int = 5, batch_size: int = 64, advance=None,
           on_forward=None) -> list[list[int]]:
    """Sample continuations of ``seeds`` with top-k sampling, deterministic for a given generator.

    Args:
        model: the causal LM.
        tok: its tokenizer.
        seeds: one prompt per sample.
        n_tokens: tokens to generate per sample.
        generator: CPU generator (seeded by the caller), or one per seed: then each row draws from
            its own, and what a seed continues with does not depend on the seeds batched with it.
        top_k: sample among the k most likely tokens.
        batch_size: samples generated together. The KV cache grows with it: the statistics'
            200 samples of 64 tokens in one batch took a cold run on SmolLM2-135M fp32 to a
            1,961 MiB peak; 64 at a time keeps it under 2x the checkpoint (bench/unlearn.py --cold).
        advance: called once per generated token of a batch (``sample_steps`` in all), for progress.
        on_forward: called after each forward pass with the (B, S) bool mask of the real tokens it
            ran (hooks can read their activations then); with it, the last sampled token is fed
            too, so every token of every returned sequence passes through the model once.

    Returns:
        For each seed, its prompt ids followed by the generated ids.
    """
    if len(seeds) > batch_size:
        rows = (lambda b: generator[b:b + batch_size]) if isinstance(generator, list) else (lambda b: generator)
        return [s for b in range(0, len(seeds), batch_size)
                for s in sample(model, tok, seeds[b:b + batch_size], n_tokens, rows(b), top_k, batch_size, advance,
                                on_forward)]
    dev = input_device(model)
    enc = [encode(tok, s) for s in seeds]
    batch = left_pad(enc, tok.pad_token_id, dev)
    mask, pos = batch.mask, batch.pos
    cache_arg = cache_kwarg(model)
    out = model(**batch.kwargs(), use_cache=True, logits_to_keep=1)
    if on_forward is not None:
        on_forward(mask.bool())
    new = []
    for step in range(n_tokens):
        logits = out.logits[:, -1].float().cpu()  # (B, vocab)
        top = logits.topk(top_k, dim=-1)
        pick = _draw(top.values.softmax(-1), generator)  # (B, 1)
        nxt = top.indices.gather(-1, pick)
        new.append(nxt)
        if advance is not None:
            advance()
        if step == n_tokens - 1 and on_forward is None:
            break
        nxt = nxt.to(dev)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{cache_arg: out[cache_arg]})
        if on_forward is not None:
            on_forward(torch.ones_like(nxt, dtype=torch.bool))
    gen = torch.cat(new, dim=1).tolist()
    return [e + g for e, g in zip(enc, gen)]


def _draw(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """One index per row of ``probs`` (B, k), from one generator or from each row's own: (B, 1)."""
    if not isinstance(generator, list):
        return torch.multinomial(probs, 1, generator=generator)
    return torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])


def sample_steps(n_seeds: int, n_tokens: int, batch_size: int = 64) -> int:
    """How many times ``sample`` calls ``advance`` for ``n_seeds`` samples of ``n_tokens``."""
    return n_tokens * -(-n_seeds // batch_size)


def neutral_ids(tok, requests: list, default: str) -> list[list[int]]:
    """Token ids of each request's neutral target (``eos`` = the tokenizer's EOS).

    Raises:
        UsageError: ``eos`` asked for but the tokenizer has none (exit 2).
    """
    out = []
    for r in requests:
        text = r.neutral or default
        if text.lower() in ("eos", "<eos>"):
            if tok.eos_token_id is None:
                raise UsageError("--neutral eos: the tokenizer has no EOS token", hint="pass --neutral TEXT")
            out.append([tok.eos_token_id])
        else:
            out.append(encode_target(tok, text))
    return out
