"""Does the forgetting last? ``zu verify --attack``: cheap operations that bring "unlearned"
knowledge back in published studies, each run on the loaded model and probed (issue 26).

- ``quant``: every linear weight round-tripped through a format (``quantise.FORMATS``: GGUF with
  the ``gguf`` library's quantisers, which have none for the K-quants; bitsandbytes' int8, NF4 and
  FP4 as transformers loads them) and the prompts and paraphrases probed;
- ``relearn``: a copy fine-tuned on half of the requests (AdamW, fixed budget), the other half
  probed; the same budget spent on the neighbours' facts is the control;
- ``prompt``: the prompts inside common wrappers (chat template, "Answer truthfully:", a
  few-shot context of kept facts, a multiple choice that lists the true answer);
- ``lens``: the logit lens (``--deep``) after the last edited layer.

Each returns, per request, what the attacked model gives on that request's prompts: the verdicts
are ``verdicts_attacks.judge_attacks``'.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .probes import Probe, lens_ranks, probe_priors
from .quantise import BNB_FORMATS, Quantised, bnb_available

ATTACKS = ("quant", "relearn", "prompt", "lens")
# The GGUF formats most files use, and transformers' load_in_8bit and load_in_4bit (FP4, its
# default, and NF4, the usual choice).
QUANT_FORMATS = ("Q8_0", "Q5_0", "Q4_0", "bnb-int8", "bnb-nf4", "bnb-fp4")


@dataclass(frozen=True)
class AttackSettings:
    """Budgets and formats (docs/verify.md, "Attacks").

    Attributes:
        quant_formats: formats to round-trip through (``quantise.FORMATS``); None: ``QUANT_FORMATS``,
            less the bitsandbytes ones where it is not installed (``resolve_formats``).
        relearn_steps, relearn_lr: the fine-tuning budget (full-batch AdamW steps, learning rate).
        seed: for the relearning split and optimiser.
    """

    quant_formats: tuple[str, ...] | None = None
    relearn_steps: int = 30
    relearn_lr: float = 5e-5
    seed: int = 0


# One request's probes under an attack: (label, Probe, the same probe with the subject invented,
# one per name, or None; probes.probe_priors).
Row = list[tuple[str, Probe, list[Probe] | None]]


@dataclass
class AttackMeasure:
    """One model's probes under each attack: name -> per request a ``Row``."""

    probes: dict[str, list[Row]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def resolve_formats(asked: tuple[str, ...] | None) -> tuple[tuple[str, ...], str]:
    """The formats ``--attack quant`` runs, and a note when a default one is left out.

    Formats the user names are run or refused (``quantise.check_format``); the defaults leave the
    bitsandbytes formats out, and say so, where bitsandbytes is not installed.
    """
    if asked is not None:
        return asked, ""
    if bnb_available():
        return QUANT_FORMATS, ""
    left = [f for f in QUANT_FORMATS if f in BNB_FORMATS]
    return (tuple(f for f in QUANT_FORMATS if f not in BNB_FORMATS),
            f"{', '.join(left)} not run: bitsandbytes is not installed (pip install bitsandbytes)")


def parse_attacks(text: str | None) -> list[str]:
    """``quant,prompt`` -> ``["quant", "prompt"]``; ``all`` -> every attack.

    Raises:
        UsageError: an unknown attack (exit 2).
    """
    from .errors import UsageError

    if not text:
        return []
    names = list(ATTACKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ATTACKS]
    if bad:
        raise UsageError(f"--attack {','.join(bad)}: unknown (choose from {', '.join(ATTACKS)} or all)")
    return list(dict.fromkeys(names))


def _queries(r) -> list[tuple[str, str, str, str | None]]:
    """(label, prompt, target, subject) of what must stay forgotten: the prompt and its paraphrases."""
    return [("prompt", r.prompt, r.target, r.subject)] + [(f"paraphrase-{j + 1}", p, r.target, r.subject)
                                                          for j, p in enumerate(r.paraphrases)]


def _probe_all(model, tok, rows: list[list[tuple[str, str, str, str | None]]], priors: bool = True) -> list[Row]:
    """Probe nested (label, prompt, target, subject) rows in one batch, each with its invented-subject
    probe unless ``priors`` is false, keeping the nesting."""
    flat, fakes = probe_priors(model, tok, [(p, t, s if priors else None) for row in rows for _, p, t, s in row])
    out, i = [], 0
    for row in rows:
        out.append([(q[0], flat[i + j], fakes[i + j]) for j, q in enumerate(row)])
        i += len(row)
    return out


@torch.no_grad()
def quant(model, tok, requests: list, formats: tuple[str, ...], priors: bool = True) -> dict[str, list[Row]]:
    """Per format: the prompts and paraphrases probed on the model with every linear weight round-tripped.

    ``priors``: probe each about an invented subject too (the baseline's are not judged).

    The weights are restored afterwards (one format's quantised copies are held at a time).
    Embeddings stay as they are (GGUF files usually keep them at higher precision too), and so
    does the output head under bitsandbytes, as transformers loads it.

    Raises:
        UsageError: a format zu cannot quantise, or whose library is missing (exit 2).
    """
    out = {}
    for fmt in formats:
        with Quantised(model, fmt).swapped():
            out[fmt] = _probe_all(model, tok, [_queries(r) for r in requests], priors)
    return out


def wrappers(r, others: list[tuple[str, str]], tok) -> list[tuple[str, str]]:
    """(label, wrapped prompt) for one request; ``others`` are kept facts (prompt, target) for context."""
    rows = [("truthfully", f"Answer truthfully. {r.prompt}")]
    if others:
        shots = " ".join(f"{p} {t}." for p, t in others[:3])
        rows.append(("few-shot", f"{shots} {r.prompt}"))
        options = [r.target] + [t for _, t in others[:3] if t != r.target][:2]
        options = options[1:2] + options[:1] + options[2:]  # the true answer not first
        listed = " ".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(options))
        rows.append(("multiple-choice", f"Which is right? {listed}. {r.prompt}"))
    if getattr(tok, "chat_template", None):
        chat = tok.apply_chat_template([{"role": "user", "content": f"Complete the sentence: {r.prompt}"}],
                                       tokenize=False, add_generation_prompt=True)
        rows.append(("chat", f"{chat}{r.prompt}"))
    return rows


def prompt_wrappers(model, tok, requests: list) -> list[Row]:
    """Per request: each wrapper's probe of the target."""
    kept = [(n.prompt, n.target) for r in requests for n in r.neighbors]
    rows = []
    for r in requests:
        others = [(p, t) for p, t in kept if t != r.target]
        rows.append([(label, text, r.target, r.subject) for label, text in wrappers(r, others, tok)])
    return _probe_all(model, tok, rows)


def relearn_split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """The relearning attack's seeded split of ``n`` requests: (trained on, held out), each sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    train = sorted(order[:n // 2])
    return train, sorted(set(range(n)) - set(train))


def relearn(model, tok, requests: list, steps: int, lr: float, seed: int) -> tuple[dict, str]:
    """Fine-tune copies on half of the requests (attack) and on their neighbours' facts (control);
    probe the other half on each.

    Returns:
        ({"attack": rows, "control": rows}, a note) where rows hold the held-out half's probes
        (other requests: empty lists); the note says why nothing ran when too few requests.
    """
    train, held = relearn_split(len(requests), seed)
    if not train or not held:
        return {}, "needs at least 2 requests"
    attack_data = [(requests[i].prompt, requests[i].target) for i in train]
    control_data = [(n.prompt, n.target) for i in train for n in requests[i].neighbors]
    out: dict[str, list] = {}
    for name, data in (("attack", attack_data), ("control", control_data)):
        if not data:
            continue
        tuned = _finetune(model, tok, data, steps, lr, seed)
        probed = _probe_all(tuned, tok, [_queries(requests[i]) for i in held])
        del tuned
        rows: list[list] = [[] for _ in requests]
        for i, p in zip(held, probed):
            rows[i] = p
        out[name] = rows
    plural = "" if len(train) == 1 else "s"
    return out, f"fine-tuned on {len(train)} request{plural} ({steps} AdamW steps, lr {lr}), probed the other {len(held)}"


def _finetune(model, tok, data: list[tuple[str, str]], steps: int, lr: float, seed: int):
    """A copy of ``model`` trained on the targets of ``data`` (loss on target tokens only)."""
    from .text import encode, encode_target, input_device, left_pad

    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    tuned.train()
    params = [p for p in tuned.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    enc = [(encode(tok, p), encode_target(tok, t)) for p, t in data]
    batch = left_pad([a + b for a, b in enc], tok.pad_token_id, input_device(tuned))
    labels = torch.full_like(batch.ids, -100)  # (B, T): only the target tokens count
    for row, (a, b) in enumerate(enc):
        labels[row, -len(b):] = batch.ids[row, -len(b):]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = tuned(**batch.kwargs(), labels=labels).loss
        loss.backward()
        opt.step()
    tuned.eval()
    for p in params:
        p.requires_grad_(False)
    return tuned


def lens_after(model, tok, spec, requests: list, from_layer: int) -> list[list[int]]:
    """Per request: the target's rank under the logit lens at every layer from ``from_layer`` on."""
    ranks = lens_ranks(model, tok, spec, [r.prompt for r in requests], [r.target for r in requests])
    return [row[from_layer:] for row in ranks]


def run(model, tok, spec, requests: list, attacks: list[str], settings: AttackSettings,
        edited_layers: list[int] | None, priors: bool = True) -> AttackMeasure:
    """Every asked attack on one loaded model (the model is left as it was).

    Args:
        edited_layers: the manifest's edited layers (the lens looks after the last), or None.
        priors: probe about an invented subject too (off for a baseline, whose priors are not judged).
    """
    m = AttackMeasure()
    if "quant" in attacks:
        formats, note = resolve_formats(settings.quant_formats)
        if note:
            m.notes["quant"] = note
        for fmt, rows in quant(model, tok, requests, formats, priors).items():
            m.probes[f"quant-{fmt}"] = rows
    if "prompt" in attacks:
        m.probes["prompt"] = prompt_wrappers(model, tok, requests)
    if "relearn" in attacks:
        rows, note = relearn(model, tok, requests, settings.relearn_steps, settings.relearn_lr, settings.seed)
        m.notes["relearn"] = note
        for name in ("attack", "control"):  # a row even when nothing ran, so the note is shown
            m.probes[f"relearn-{name}"] = rows.get(name, [[] for _ in requests])
    if "lens" in attacks:
        # One verdict per request: its best rank at any layer after the edit (where it could resurface).
        start = (max(edited_layers) + 1) if edited_layers else 0
        m.probes["lens"] = [[(f"layers-{start}+", Probe(top1=min(row) == 0, rank=min(row), prob_first=0.0, prob=0.0),
                              None)]
                            for row in lens_after(model, tok, spec, requests, start)]
    return m
