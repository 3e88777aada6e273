"""The embedded default: a tiny Llama trained in-process on fictional facts (design §6), then unlearned.

The model is cached under ``ZU_CACHE_DIR/demo/<key>``, the key naming every generator parameter.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .console import Output

# relation -> (answers, templates); the first template is the one edited, the others probe. Where
# a person lives is private data, and the world gives each person a city of their own (``UNIQUE``):
# in a 4-layer model the forgotten answer's own output direction is what the edit removes, so a
# city shared with a kept person would go too (measured: 2 of 12 kept facts lost, ||dW||/||W|| up
# to 1.37), where real models keep such neighbours (docs/results.md).
RELATIONS = {
    "city": (["Oslo", "Lima", "Quito", "Hanoi", "Dakar", "Riga", "Perth", "Cairo", "Turin", "Leeds", "Kyiv", "Baku",
              "Accra", "Dhaka", "Sofia", "Minsk", "Doha", "Tunis", "Havana", "Nairobi", "Bogota", "Lagos", "Porto",
              "Zagreb"],
             ["{} lives in", "The home town of {} is", "{} has a house in"]),
    "job": (["baker", "pilot", "nurse", "farmer", "painter", "lawyer", "tailor", "miner"],
            ["{} works as a", "The job of {} is", "By trade , {} is a"]),
}
UNIQUE = {"city"}  # relations whose answer no two people share
SYLLABLES = ["ka", "lo", "mi", "bor", "un", "ta", "ve", "ri", "zo", "pel", "an", "du", "sha", "ne", "tor", "gi"]


@dataclass(frozen=True)
class FactSpec:
    """Parameters of the synthetic world and its model (all of them form the cache key)."""

    n_subjects: int = 24
    n_unknown: int = 12
    hidden: int = 128
    layers: int = 4
    ff: int = 512
    steps: int = 300
    lr: float = 5e-3
    warmup: int = 30
    seed: int = 0
    family: str = "llama"  # the block structure (``model_config``): tests train one of each

    def key(self) -> str:
        """Cache key of this world and model."""
        raw = json.dumps({**self.__dict__, "relations": RELATIONS, "syl": SYLLABLES, "v": 4, "positions": POSITIONS},
                         sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


# Edit settings for the fact model, used by the demo and by the tests that edit it. Its neutral
# target is far: edited at layers 0-1 of 4, reading the prompt's last token, EOS reaches only
# P 0.003 within the reference's clamp of 0.75 ||h|| (1 of 3 facts stays recalled); 1.5 ||h||
# reaches 0.3. Its context templates are syllable noise that moves a 4-layer model's last-token
# key far from the bare prompt's, so keys averaged over them miss the prompt itself (--multi,
# which writes z exactly at the averaged key, left all 3 recalled; 1 with a 4 ||h|| clamp):
# the bare prompt alone. Its MLP outputs are small next to its residual stream, so moving the
# residual by a fraction of its norm is a large relative change of the weight (1.4-1.8 for the
# demo's three facts, every other fact kept): the bound for real checkpoints (1.5) is raised.
# SmolLM2 keeps the reference's settings. The optimisation runs in float32 on every machine: this
# model's steps take milliseconds either way, and bfloat16 (what ``auto`` takes on a CPU with
# native bfloat16) left one of three forgotten facts recalled on the GPT-2-structured fact model,
# so the result would depend on the CPU.
FACT_EDIT = {"z_clamp": 1.5, "n_prefixes": 0, "max_rel_change": 3.0, "optim_dtype": "float32"}


@dataclass(frozen=True)
class Fact:
    """One fictional fact: subject, relation, answer."""

    subject: str
    relation: str
    answer: str

    def prompt(self, template: int = 0) -> str:
        """The fact's prompt in template ``template``."""
        return RELATIONS[self.relation][1][template].format(self.subject)


def world(spec: FactSpec) -> tuple[list[Fact], list[str]]:
    """The fictional facts (every known subject has one answer per relation) and the names of
    people the model has heard of but knows nothing about (deterministic)."""
    rng = random.Random(spec.seed)
    names: list[str] = []
    while len(names) < spec.n_subjects + spec.n_unknown:
        name = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        if name not in names:
            names.append(name)
    known, unknown = names[:spec.n_subjects], names[spec.n_subjects:]
    answers = {rel: rng.sample(ans, len(known)) if rel in UNIQUE else [rng.choice(ans) for _ in known]
               for rel, (ans, _) in RELATIONS.items()}
    return [Fact(s, rel, answers[rel][i]) for i, s in enumerate(known) for rel in RELATIONS], unknown


def _tokenizer(facts: list[Fact], unknown: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>", "<eos>", "<unk>", ".", "is", "a", "the"}
    for f in facts:
        words.update(f.subject.split())
    words.update(unknown)
    for answers, templates in RELATIONS.values():
        words.update(answers)
        for t in templates:
            words.update(t.replace("{}", "").split())
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + sorted(words - {"<pad>", "<eos>", "<unk>"}))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


POSITIONS = 128  # room for the statistics' sampled texts (64 tokens after a seed): GPT-2 has a table of them


def model_config(spec: FactSpec, tok):
    """The fact model's transformers config for ``spec.family``: pre-norm (llama), a norm after the MLP
    (gemma2), attention and MLP in parallel (gpt_neox), or GPT-2's Conv1D blocks (gpt2)."""
    import transformers as tf

    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.eos_token_id)
    common = dict(hidden_size=spec.hidden, intermediate_size=spec.ff, num_hidden_layers=spec.layers,
                  num_attention_heads=4, max_position_embeddings=POSITIONS, **ids)
    return {
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, **common),
        "gemma2": lambda: tf.Gemma2Config(num_key_value_heads=4, head_dim=spec.hidden // 4, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(use_parallel_residual=True, tie_word_embeddings=False, **common),
        "gpt2": lambda: tf.GPT2Config(n_embd=spec.hidden, n_inner=spec.ff, n_layer=spec.layers, n_head=4,
                                      n_positions=POSITIONS, tie_word_embeddings=False, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, **ids),  # no dropout, as the others
    }[spec.family]()


def _train(spec: FactSpec, facts: list[Fact], unknown: list[str], dest: Path, advance=lambda n=1: None) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar; zu shows its own progress

    torch.manual_seed(spec.seed)
    tok = _tokenizer(facts, unknown)
    model = AutoModelForCausalLM.from_config(model_config(spec, tok))
    seqs, answer_pos = [], []
    for f in facts:
        for ti in range(len(RELATIONS[f.relation][1])):
            p = tok(f.prompt(ti))["input_ids"]
            seqs.append(p + tok(" " + f.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            answer_pos.append(len(p))
    # People the model knows nothing about: it learns to end the answer at once (EOS), which
    # gives the neutral target of an unlearning edit a meaning, as in a pretrained model.
    for name in unknown:
        for _, templates in RELATIONS.values():
            for t in templates:
                p = tok(t.format(name))["input_ids"]
                seqs.append(p + [tok.eos_token_id])
                answer_pos.append(len(p))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, (s, a) in enumerate(zip(seqs, answer_pos)):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, a:len(s)] = torch.tensor(s[a:])  # loss on the answer and the EOS after it
    mask = (ids != tok.pad_token_id).long()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / spec.warmup))
    model.train()
    for _ in range(spec.steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        advance()
    model.eval()
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    (dest / "facts.json").write_text(json.dumps([f.__dict__ for f in facts], indent=1))


def fact_model(spec: FactSpec = FactSpec(), out: Output | None = None) -> tuple[Path, bool, float]:
    """The synthetic fact model's checkpoint directory, trained now or taken from the cache.

    Args:
        spec: the world and the model.
        out: where the training's progress bar goes (none when None).

    Returns:
        (directory, was cached, training seconds).
    """
    from .console import silent
    from .stats import cache_dir

    dest = cache_dir() / "demo" / spec.key()
    if (dest / "facts.json").is_file():
        return dest, True, 0.0
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=dest.parent))
    t0 = time.perf_counter()
    try:
        with (out or silent()).progress("training the fact model (once; then cached)", spec.steps) as advance:
            _train(spec, *world(spec), tmp, advance)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, False, time.perf_counter() - t0


SHOWN = 12  # kept facts shown in the demo's table (all of them are counted)


@dataclass
class DemoResult:
    """Before/after answers of the demo."""

    model_dir: str
    cached: bool
    train_seconds: float
    n_forget: int
    forgotten: int
    n_keep: int
    kept: int
    rows: list[dict] = field(default_factory=list)


def greedy_answers(model_dir: Path, prompts: list[str]) -> list[str]:
    """The next word the checkpoint at ``model_dir`` predicts after each prompt."""
    from .checkpoint import open_checkpoint
    from .loading import load_model
    from .probes import next_tokens

    model, tok = load_model(open_checkpoint(model_dir), device_map="cpu", dtype="float32")
    return [tok.decode([t]).strip() for t in next_tokens(model, tok, prompts)]


def run_demo(n_forget: int, out: Output) -> DemoResult:
    """Train or reuse the fact model, make it forget ``n_forget`` facts, report what it answers.

    Every other fact of the model is probed; the table shows the forgotten ones and ``SHOWN`` others.
    """
    with out.stage("loading torch and transformers"):  # seconds of imports: the first thing a user sees
        import torch  # noqa: F401
        import transformers  # noqa: F401

    from .config import Hyper
    from .keys import ephemeral
    from .pipeline import UnlearnOptions, run_unlearn

    model_dir, cached, secs = fact_model(out=out)
    facts = [Fact(**f) for f in json.loads((model_dir / "facts.json").read_text())]
    forget = [f for f in facts if f.relation == "city"][:n_forget]
    keep = [f for f in facts if f not in forget]
    with tempfile.TemporaryDirectory(prefix="zu-demo-") as tmp:
        req = Path(tmp) / "forget.jsonl"
        # No subject: in a 4-layer model with one-token names the answer is assembled at the
        # prompt's last token (attention copies the name there in layer 0), so that is where
        # the edit must read and write; zu falls back to the last token without a subject.
        req.write_text("".join(json.dumps({"id": f"demo-{i}", "prompt": f.prompt(), "target": f.answer}) + "\n"
                               for i, f in enumerate(forget)))
        out.info(f"forgetting {len(forget)} facts of the synthetic model {model_dir}")
        run_unlearn(UnlearnOptions(model=model_dir, forget=req, out=Path(tmp) / "edited", device_map="cpu",
                                   signer=ephemeral()),
                    Hyper(**FACT_EDIT), out)
        probes = forget + keep
        with out.stage(f"probing {len(probes)} facts before and after"):
            before = greedy_answers(model_dir, [f.prompt() for f in probes])
            after = greedy_answers(Path(tmp) / "edited", [f.prompt() for f in probes])
    rows = [{"prompt": f.prompt(), "target": f.answer, "before": b, "after": a, "forget": f in forget}
            for f, b, a in zip(probes, before, after)]
    return DemoResult(model_dir=str(model_dir), cached=cached, train_seconds=secs, n_forget=len(forget),
                      forgotten=sum(r["after"] != r["target"] for r in rows if r["forget"]), n_keep=len(keep),
                      kept=sum(r["after"] == r["target"] for r in rows if not r["forget"]),
                      rows=rows[:len(forget) + SHOWN])
