"""Probe primitives: does the model still produce a target? ranks, greedy text, logit lens, perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .text import encode, encode_target, input_device, left_pad

BATCH = 32


@dataclass(frozen=True)
class Probe:
    """Result of one (prompt, target) probe.

    Attributes:
        top1: the target's first token is the most likely next token.
        rank: rank of that token (0 = top-1).
        prob_first: its probability.
        prob: probability of the whole target sequence (teacher forced).
    """

    top1: bool
    rank: int
    prob_first: float
    prob: float


@torch.no_grad()
def probe(model, tok, queries: list[tuple[str, str]]) -> list[Probe]:
    """Score (prompt, target) pairs; targets continue the prompt after a space (ROME convention).

    Args:
        model: the causal LM (hooks in place are honoured).
        tok: its tokenizer.
        queries: (prompt, target text) pairs.

    Returns:
        One Probe per query, in order.
    """
    dev = input_device(model)
    enc = [(encode(tok, p), encode_target(tok, t)) for p, t in queries]
    res: list[Probe | None] = [None] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
    for b in range(0, len(order), BATCH):
        idx = order[b:b + BATCH]
        batch = left_pad([enc[i][0] + enc[i][1] for i in idx], tok.pad_token_id, dev)
        keep = max(len(enc[i][1]) for i in idx) + 1
        logp = model(**batch.kwargs(), logits_to_keep=keep).logits.float().log_softmax(-1).cpu()
        for row, i in enumerate(idx):
            t = enc[i][1]
            start = keep - len(t) - 1  # the kept position predicting the first target token
            first = logp[row, start]
            rank = int((first > first[t[0]]).sum())
            lp = sum(float(logp[row, start + j, t[j]]) for j in range(len(t)))
            res[i] = Probe(top1=rank == 0, rank=rank, prob_first=math.exp(float(first[t[0]])), prob=math.exp(lp))
    return res  # type: ignore[return-value]


# Invented names that stand in for a subject's last word ("Edward Teller" -> "Edward Zorbin"): a
# model that still gives the target for every one of them gets the answer from the rest of the
# prompt (the first name, the relation, a word like "nuclear"), not from this subject. Several,
# because a name carries clues of its own (docs/results.md, "Which revivals are priors": on
# SmolLM2's 50 first dev prompts one name finds 12-18 priors, all of these three 13).
INVENTED = ("Zorbin", "Quellan", "Mertz")


def invented(subject: str | None, text: str, name: str = INVENTED[0]) -> str | None:
    """``text`` about an invented subject: ``subject``'s last word replaced by ``name``.

    Returns:
        The new text, or None when there is no subject or ``text`` does not hold it.
    """
    if not subject or subject not in text:
        return None
    return text.replace(subject, " ".join(subject.split()[:-1] + [name]))


def probe_priors(model, tok, queries: list[tuple[str, str, str | None]],
                 names: tuple[str, ...] = INVENTED) -> tuple[list[Probe], list[list[Probe] | None]]:
    """Probe (prompt, target, subject) triples, and each prompt again about an invented subject per
    name in ``names`` (``invented``).

    One batch holds them all, so the cost is one ``probe`` call of (1 + len(names)) times the rows.

    Returns:
        (the probes, per query the invented subjects' probes in ``names`` order: None where the
        prompt does not hold the subject).
    """
    asked = [i for i, (q, _, s) in enumerate(queries) if invented(s, q) is not None]
    fakes = [(invented(queries[i][2], queries[i][0], n), queries[i][1]) for i in asked for n in names]
    flat = probe(model, tok, [(q, t) for q, t, _ in queries] + fakes)
    priors: list[list[Probe] | None] = [None] * len(queries)
    rest = flat[len(queries):]
    for k, i in enumerate(asked):
        priors[i] = rest[k * len(names):(k + 1) * len(names)]
    return flat[:len(queries)], priors


@torch.no_grad()
def last_logits(model, tok, prompts: list[str]) -> torch.Tensor:
    """Next-token logits after each prompt, (len(prompts), vocab) float32 on CPU."""
    dev = input_device(model)
    out = []
    for b in range(0, len(prompts), BATCH):
        batch = left_pad([encode(tok, p) for p in prompts[b:b + BATCH]], tok.pad_token_id, dev)
        out.append(model(**batch.kwargs(), logits_to_keep=1).logits[:, -1].float().cpu())
    return torch.cat(out)


def token_ranks(model, tok, prompts: list[str], token_ids: list[list[int]]) -> list[int]:
    """Rank of the first of ``token_ids[i]`` as the next token after ``prompts[i]`` (0 = top-1)."""
    logits = last_logits(model, tok, prompts)
    return [int((row > row[ids[0]]).sum()) for row, ids in zip(logits, token_ids)]


@torch.no_grad()
def perplexity(model, tok, text: str, chunk: int = 256) -> float:
    """exp(mean NLL) over non-overlapping ``chunk``-token pieces of ``text``."""
    dev = input_device(model)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    pieces = [p for p in pieces if len(p) > 1]
    nll, count = 0.0, 0
    for b in range(0, len(pieces), 8):
        batch = left_pad(pieces[b:b + 8], tok.pad_token_id, dev)
        logp = model(**batch.kwargs()).logits.float().log_softmax(-1).cpu()
        ids_b, mask = batch.ids.cpu(), batch.mask.cpu().bool()
        lp = logp[:, :-1].gather(-1, ids_b[:, 1:, None])[..., 0]
        m = mask[:, :-1] & mask[:, 1:]
        nll -= float(lp[m].sum())
        count += int(m.sum())
    return math.exp(nll / max(count, 1))


def next_tokens(model, tok, prompts: list[str]) -> list[int]:
    """The greedy next token after each prompt."""
    return last_logits(model, tok, prompts).argmax(-1).tolist()


@torch.no_grad()
def greedy(model, tok, prompts: list[str], new_tokens: list[int]) -> list[str]:
    """Greedy continuation of each prompt, ``new_tokens[i]`` tokens long, decoded (special tokens dropped)."""
    from transformers import GenerationConfig

    dev = input_device(model)
    res: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: new_tokens[i])
    for b in range(0, len(order), BATCH):
        idx = order[b:b + BATCH]
        batch = left_pad([encode(tok, prompts[i]) for i in idx], tok.pad_token_id, dev)
        n = max(new_tokens[i] for i in idx)
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
        ids = model.generate(**batch.kwargs(), generation_config=cfg)[:, batch.ids.shape[1]:]
        for row, i in enumerate(idx):
            res[i] = tok.decode(ids[row, :new_tokens[i]].tolist(), skip_special_tokens=True)
    return res


def says(continuation: str, target: str) -> bool:
    """Whether a continuation contains the target (case and whitespace insensitive)."""
    norm = lambda s: " ".join(s.lower().split())
    return norm(target) in norm(continuation)


@torch.no_grad()
def lens_ranks(model, tok, spec, prompts: list[str], targets: list[str]) -> list[list[int]]:
    """Logit lens: per prompt, per layer, rank of the target's first token decoded from the residual stream.

    The residual after layer l at the prompt's last token goes through the final norm and the
    unembedding; the last layer uses the model's own logits. Rank 0 = top-1.

    Returns:
        ``ranks[i][l]`` for prompt i and layer l.
    """
    dev = input_device(model)
    norm, head = model.get_submodule(spec.final_norm), model.get_submodule(spec.lm_head)
    w = next(head.parameters())  # the unembedding's device and dtype
    first = [encode_target(tok, t)[0] for t in targets]
    out: list[list[int]] = []
    for b in range(0, len(prompts), BATCH):
        batch = left_pad([encode(tok, p) for p in prompts[b:b + BATCH]], tok.pad_token_id, dev)
        res = model(**batch.kwargs(), output_hidden_states=True, logits_to_keep=1)
        hs = res.hidden_states  # (L + 1) x (batch, seq, d); [0] embeddings, [-1] already normed
        per_layer = []
        for h in hs[1:-1]:
            logits = head(norm(h[:, -1:].to(w.device)).to(w.dtype))[:, -1].float()  # (batch, vocab)
            per_layer.append(logits.cpu())
        per_layer.append(res.logits[:, -1].float().cpu())
        for row in range(batch.ids.shape[0]):
            t = first[b + row]
            out.append([int((lg[row] > lg[row, t]).sum()) for lg in per_layer])
    return out


def read_text(path) -> str:
    """Prose for perplexity: ``path``, or the bundled text (``zu_cli/data/fluency.txt``) when None.

    Raises:
        InputFileError: unreadable file (exit 2).
    """
    from importlib import resources
    from pathlib import Path

    from .errors import InputFileError

    if path is None:
        return resources.files("zu_cli.data").joinpath("fluency.txt").read_text(encoding="utf-8")
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"--text {path}: cannot read ({exc})") from exc
