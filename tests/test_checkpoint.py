"""Checkpoint I/O: write round trips on every architecture, atomic writes, loading with offload."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch

from conftest import FAMILIES
from zu_cli.arch import lookup
from zu_cli.checkpoint import open_checkpoint, write_checkpoint
from zu_cli.loading import load_model
from zu_cli.errors import CheckpointError, UsageError


@pytest.mark.parametrize("family", FAMILIES)
def test_write_round_trip_changes_only_the_edited_tensor(tiny_models, tmp_path, family):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tiny_models[family]
    ckpt = open_checkpoint(src)
    assert len(ckpt.shards()) > 1, "fixture should be sharded"
    name = ckpt.spec.down_proj_weight(1)
    old = ckpt.read_tensor(name)
    assert old.dtype == torch.bfloat16
    new = old.float() + 0.05 * torch.randn(old.shape)
    out = write_checkpoint(ckpt, tmp_path / "out", {name: new})

    edited_shard = ckpt.weight_map[name]
    assert (out / edited_shard).stat().st_size == (src / edited_shard).stat().st_size  # layout kept
    for shard in ckpt.shards():
        same = filecmp.cmp(src / shard, out / shard, shallow=False)
        assert same == (shard != edited_shard), shard
    for f in ("config.json", "tokenizer.json", "README.md", "model.safetensors.index.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    with safe_open(src / edited_shard, "pt") as a, safe_open(out / edited_shard, "pt") as b:
        assert a.metadata() == b.metadata()
        assert list(a.keys()) == list(b.keys())
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape
            assert torch.equal(ta, tb) == (k != name), k
    assert torch.equal(open_checkpoint(out).read_tensor(name), new.to(torch.bfloat16))
    m_src = AutoModelForCausalLM.from_pretrained(src)
    m_out = AutoModelForCausalLM.from_pretrained(out)
    s_src, s_out = m_src.state_dict(), m_out.state_dict()
    differing = {k for k in s_src if not torch.equal(s_src[k], s_out[k])}
    assert differing == {name}


def test_single_file_checkpoint_and_tied_weights(tmp_path):
    from conftest import build_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    cfg = tiny_config("llama", len(tok))
    cfg.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    ckpt = open_checkpoint(tmp_path / "src")
    assert ckpt.shards() == ["model.safetensors"]
    name = ckpt.spec.down_proj_weight(0)
    write_checkpoint(ckpt, tmp_path / "out", {name: ckpt.read_tensor(name) * 2})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight * 2)


def test_interrupted_write_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    import zu_cli.checkpoint as C

    ckpt = open_checkpoint(tiny_models["llama"])
    name = ckpt.spec.down_proj_weight(1)
    real = C._overwrite_tensors

    def boom(*a, **k):  # interrupted after the edited shard's bytes were written
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_overwrite_tensors", boom)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(ckpt, tmp_path / "out", {name: ckpt.read_tensor(name)})
    assert list(tmp_path.iterdir()) == []


def test_existing_out_refused_then_forced(tiny_models, tmp_path):
    """--force replaces a previous zu output (it holds a manifest), never a directory of other files."""
    ckpt = open_checkpoint(tiny_models["llama"])
    name = ckpt.spec.down_proj_weight(0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(UsageError):
        write_checkpoint(ckpt, tmp_path / "out", {name: ckpt.read_tensor(name)})
    with pytest.raises(UsageError, match="not a zu output"):
        write_checkpoint(ckpt, tmp_path / "out", {name: ckpt.read_tensor(name)}, force=True)
    assert (tmp_path / "out" / "old.txt").read_text() == "x"
    (tmp_path / "out" / "zu-manifest.json").write_text("{}")  # a previous zu output
    write_checkpoint(ckpt, tmp_path / "out", {name: ckpt.read_tensor(name)}, force=True)
    assert not (tmp_path / "out" / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(UsageError):
        write_checkpoint(ckpt, ckpt.path, {name: ckpt.read_tensor(name)}, force=True)


def test_input_is_never_modified(tiny_models, tmp_path):
    from zu_cli.manifest import dir_digests

    src = tiny_models["gpt2"]
    before = dir_digests(src)
    ckpt = open_checkpoint(src)
    name = ckpt.spec.down_proj_weight(2)
    write_checkpoint(ckpt, tmp_path / "o", {name: ckpt.read_tensor(name) + 1})
    assert dir_digests(src) == before


def test_wrong_shape_is_refused(tiny_models, tmp_path):
    ckpt = open_checkpoint(tiny_models["llama"])
    name = ckpt.spec.down_proj_weight(0)
    with pytest.raises(CheckpointError, match="shape"):
        write_checkpoint(ckpt, tmp_path / "o", {name: ckpt.read_tensor(name).T})
    assert not (tmp_path / "o").exists()


def test_gpt2_orientation_comes_from_architecture_data(tiny_models):
    ckpt = open_checkpoint(tiny_models["gpt2"])
    assert ckpt.spec.transposed and ckpt.spec.bias
    w = ckpt.read_tensor(ckpt.spec.down_proj_weight(0))
    assert tuple(w.shape) == (ckpt.config.n_inner or 4 * ckpt.config.n_embd, ckpt.config.n_embd)


@pytest.mark.parametrize("problem", ["missing_dir", "no_config", "missing_shard", "corrupt_shard", "unsupported"])
def test_bad_checkpoints_exit_3_naming_the_file(tiny_models, tmp_path, problem):
    import shutil

    src = tmp_path / "ck"
    shutil.copytree(tiny_models["llama"], src)
    shard = sorted(src.glob("*.safetensors"))[0]
    if problem == "missing_dir":
        src = tmp_path / "nope"
    elif problem == "no_config":
        (src / "config.json").unlink()
    elif problem == "missing_shard":
        shard.unlink()
    elif problem == "corrupt_shard":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(architectures=["MambaForCausalLM"], model_type="mamba")
        (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(src)
    assert info.value.exit_code == 3
    expect = {"missing_dir": "nope", "no_config": "config.json", "missing_shard": shard.name,
              "corrupt_shard": shard.name, "unsupported": "config.json: unsupported architecture ['MambaForCausalLM']"}[problem]
    assert expect in info.value.message + (info.value.hint or "")
    if problem == "unsupported":
        assert "llama" in info.value.hint and "gpt2" in info.value.hint


def test_offloaded_model_gives_the_same_logits(tiny_models, tmp_path):
    ckpt = open_checkpoint(tiny_models["llama"])
    plain, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    off, _ = load_model(ckpt, device_map="auto", max_memory="cpu=120KB", offload_dir=str(tmp_path / "off"),
                        dtype="float32")
    placed = set(off.hf_device_map.values())
    assert "disk" in placed, off.hf_device_map
    ids = tok("The quick brown fox jumps", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, off(**ids).logits, atol=1e-5)


def test_every_family_has_architecture_data(tiny_models):
    for fam, path in tiny_models.items():
        spec = open_checkpoint(path).spec
        assert spec.name == fam
        assert lookup(open_checkpoint(path).config) == spec
