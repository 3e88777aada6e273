"""Shared fixtures: tiny random models for every supported architecture, the synthetic fact model,
and (slow tier) SmolLM2-135M from the package registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "gptj", "opt"]
CORPUS = ("The mother tongue of Danielle Darrieux is French. Kalomi lives in Oslo and works as a baker. "
          "Paris is the capital of France. The quick brown fox jumps over the lazy dog. " * 4)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Statistics and demo caches go to a per-session folder unless the caller pinned one."""
    if not os.environ.get("ZU_CACHE_DIR"):
        os.environ["ZU_CACHE_DIR"] = str(tmp_path_factory.mktemp("zu-cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def signing_key(tmp_path_factory) -> Path:
    """A default signing key (as `zu keygen` makes) in a per-session config dir, so unlearn can sign."""
    from zu_cli.keys import keygen

    cfg = tmp_path_factory.mktemp("zu-config")
    os.environ["ZU_CONFIG_DIR"] = str(cfg)
    os.environ.pop("ZU_SIGNING_KEY", None)
    priv, _, _ = keygen(cfg)
    return priv


def build_tokenizer():
    """A small byte-level BPE tokenizer trained on CORPUS (leading-space variants like real ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(family: str, vocab: int):
    """A transformers config of ``family`` with hidden 64 and 3 layers."""
    import transformers as tf

    common = dict(vocab_size=vocab, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    return {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "qwen3": lambda: tf.Qwen3Config(head_dim=16, **llama_like),
        "gemma2": lambda: tf.Gemma2Config(head_dim=16, **llama_like),
        "gemma3": lambda: tf.Gemma3TextConfig(head_dim=16, **llama_like),
        "phi3": lambda: tf.Phi3Config(**llama_like),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4, max_position_embeddings=128, **common),
        "gptj": lambda: tf.GPTJConfig(n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=128, **common),
        "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                    word_embed_proj_dim=64, max_position_embeddings=128, **common),
    }[family]()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """family -> checkpoint dir: random weights, saved bf16 in several shards, with a real tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(fam, len(tok)), dtype=torch.bfloat16)
        path = root / fam
        model.save_pretrained(path, max_shard_size="60KB")
        tok.save_pretrained(path)
        (path / "README.md").write_text(f"tiny {fam} test model\n")
        out[fam] = path
    return out


@pytest.fixture(scope="session")
def fact_model_dir() -> Path:
    """The synthetic fact model (trained once per cache)."""
    from zu_cli.demo import fact_model

    return fact_model()[0]


@pytest.fixture(scope="session")
def fact_config(tmp_path_factory) -> Path:
    """``--config`` file with the settings the demo edits the fact model with (demo.FACT_EDIT)."""
    from zu_cli.demo import FACT_EDIT

    path = tmp_path_factory.mktemp("fact-config") / "fact.yaml"
    path.write_text(yaml.safe_dump(FACT_EDIT))
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M fp32 (slow tier); skipped with a reason only when the registry is unreachable."""
    from smollm2 import smollm2_fp32

    try:
        return smollm2_fp32()
    except RuntimeError as exc:
        pytest.skip(f"SmolLM2 unavailable (package registry unreachable?): {exc}")


@pytest.fixture(scope="session")
def smollm2_bf16(smollm2) -> Path:
    """SmolLM2-135M as a bf16 sharded checkpoint (slow tier)."""
    from smollm2 import smollm2_bf16_sharded

    return smollm2_bf16_sharded()


DATA = Path(__file__).parent / "data"
