"""Checkpoints in and out: open one (files, config, architecture) and write edited tensors atomically.

Loading it for computing (device maps, dtypes) is ``loading``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .arch import ArchSpec, lookup
from .errors import CheckpointError, OutputError, UsageError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class Checkpoint:
    """A checkpoint directory and what zu read from it (no weights).

    Attributes:
        path: the directory.
        config: the transformers config.
        spec: the architecture data.
        weight_map: tensor name -> shard file name.
        disk_dtypes: tensor name -> dtype string as stored (e.g. ``BF16``).
        hub: ``{"repo_id", "revision"}`` when the checkpoint came from a hub id, else None.
    """

    path: Path
    config: Any
    spec: ArchSpec
    weight_map: dict[str, str]
    disk_dtypes: dict[str, str]
    hub: dict[str, str] | None = None

    @property
    def name(self) -> str:
        """How the user named it: the hub id, or the directory's name."""
        return self.hub["repo_id"] if self.hub else self.path.name

    def shards(self) -> list[str]:
        """Distinct shard file names, sorted."""
        return sorted(set(self.weight_map.values()))

    def read_tensor(self, name: str):
        """One tensor exactly as stored on disk (no cast).

        Raises:
            CheckpointError: the tensor is not in the checkpoint.
        """
        from safetensors import safe_open

        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the checkpoint")
        with safe_open(self.path / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name)


def resolve_path(model: str | Path) -> tuple[Path, dict[str, str] | None]:
    """The local directory of ``--model``: the path itself, or a hub id's cached snapshot (``hub.resolve``).

    Returns:
        (directory, ``{"repo_id", "revision"}`` for a hub id, else None).

    Raises:
        CheckpointError: a hub id that cannot be resolved (exit 3).
    """
    from .hub import looks_like_hub_id, resolve

    if looks_like_hub_id(str(model)):
        return resolve(str(model))
    return Path(model), None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint directory and read its config, architecture and tensor index.

    Args:
        path: a directory with ``config.json`` and safetensors weights (single file or sharded),
            or a Hugging Face Hub id ``org/name[@revision]`` (``hub.resolve``) when no such
            directory exists.

    Returns:
        The Checkpoint.

    Raises:
        CheckpointError: missing directory/config/shard, unreadable or corrupt file, unsupported
            architecture (exit 3), with the file named.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    path, hub = resolve_path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found",
                              hint="a local directory, or a Hugging Face Hub id such as org/name[@revision]")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'}: missing", hint="a Hugging Face checkpoint directory has a config.json")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: unreadable config: {str(exc).splitlines()[0]}") from exc
    try:
        spec = lookup(config)
    except CheckpointError as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc.message}", exc.hint) from exc
    if (path / INDEX).is_file():
        try:
            shard_of = json.loads((path / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path / INDEX}: corrupt index ({exc})") from exc
        files = sorted(set(shard_of.values()))
    elif (path / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}",
                              hint="zu reads and writes safetensors checkpoints; convert .bin weights first")
    weight_map, disk_dtypes = {}, {}
    for fname in files:
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: shard listed in the index is missing")
        try:
            with safe_open(fpath, framework="pt") as f:
                for name in f.keys():
                    weight_map[name] = fname
                    disk_dtypes[name] = f.get_slice(name).get_dtype()
        except Exception as exc:  # safetensors raises several types for a corrupt or truncated header
            raise CheckpointError(f"{fpath}: corrupt safetensors file ({str(exc).splitlines()[0]})") from exc
    return Checkpoint(path=path, config=config, spec=spec, weight_map=weight_map, disk_dtypes=disk_dtypes,
                      hub=hub)


def check_out(ckpt: Checkpoint, out: Path, force: bool) -> None:
    """Refuse an output path that is the input (or inside it), that exists without ``force``, or
    that ``force`` may not replace: only a previous zu output (it holds a zu manifest) or an empty
    directory is ever replaced, so that nothing zu did not write is deleted.

    Raises:
        UsageError: exit 2.
    """
    from .manifest import has_manifest

    if out.resolve() == ckpt.path.resolve() or ckpt.path.resolve() in out.resolve().parents:
        raise UsageError(f"--out {out}: must not be the input checkpoint or inside it")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UsageError(f"--out {out}: already exists", hint="choose another path or pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory; --force replaces only a previous zu output")
    if any(out.iterdir()) and not has_manifest(out):
        raise UsageError(f"--out {out}: not a zu output (no zu manifest in it) and not empty; --force replaces "
                         "only a previous zu output", hint="choose another path, or move its files away yourself")


def write_checkpoint(ckpt: Checkpoint, out: str | Path, edited: dict[str, Any], force: bool = False,
                     finalize: Callable[[Path], None] | None = None,
                     on_file: Callable[..., None] | None = None) -> Path:
    """Write ``ckpt`` with ``edited`` tensors replaced, atomically (design §3).

    Every file is copied byte for byte; in a shard holding an edited tensor, only that tensor's
    bytes are then overwritten in place (cast to the dtype stored on disk), so the header, the
    metadata, every other tensor and the byte layout stay as they were, and memory holds one
    tensor at a time rather than the shard. Everything else in the directory is carried over.
    The output is built in a temporary sibling and renamed into place.

    Args:
        ckpt: the source checkpoint (never modified).
        out: output directory.
        edited: tensor name -> new value (any float dtype, any device).
        force: replace an existing ``out`` that a previous zu run wrote (``check_out``).
        finalize: called with the temporary directory once every weight file is in it, before the
            rename (writes the manifest, which digests the files).
        on_file: called after each file or folder of the source is carried over (progress).

    Returns:
        The output path.

    Raises:
        UsageError: ``out`` exists without ``force``, is the input, or is not a zu output (exit 2).
        CheckpointError: an edited tensor is unknown or has the wrong shape (exit 3).
        OutputError: the file system refused the write (exit 6); nothing is left behind.
    """
    out = Path(out)
    check_out(ckpt, out, force)
    by_shard: dict[str, dict[str, Any]] = {}
    for name, tensor in edited.items():
        if name not in ckpt.weight_map:
            raise CheckpointError(f"{ckpt.path}: edited tensor {name!r} is not in the checkpoint")
        by_shard.setdefault(ckpt.weight_map[name], {})[name] = tensor
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.zu-tmp-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot create it ({exc.strerror or exc})") from exc
    try:
        for src in sorted(ckpt.path.rglob("*")):
            rel = src.relative_to(ckpt.path)
            dst = tmp / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)  # follows links: a hub cache snapshot holds links to blobs
                if str(rel) in by_shard:
                    _overwrite_tensors(src, dst, by_shard[str(rel)])
            if on_file is not None:
                on_file()
        if finalize is not None:
            finalize(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.zu-old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:  # disk full, permission denied: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"--out {out}: cannot write the checkpoint ({exc.strerror or exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _overwrite_tensors(src: Path, dst: Path, edited: dict[str, Any]) -> None:
    """Overwrite the bytes of ``edited`` tensors in ``dst``, a byte copy of the safetensors file ``src``.

    The safetensors layout is an 8-byte little-endian header length, a JSON header giving each
    tensor's ``data_offsets`` within the data section, then the data. An edited tensor keeps its
    name, dtype and shape, so its byte range is unchanged and no other byte moves.

    Raises:
        CheckpointError: an edited tensor's shape differs from the stored one (exit 3).
    """
    import sys

    import torch

    if sys.byteorder != "little":  # safetensors data is little-endian; tensors' bytes are native
        raise CheckpointError(f"{src}: writing safetensors on a big-endian machine is not supported")
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))  # name -> {dtype, shape, data_offsets}
    with open(dst, "r+b") as g:
        for name, new in edited.items():
            stored = header[name]
            shape = tuple(stored["shape"])
            if tuple(new.shape) != shape:
                raise CheckpointError(f"{src}: edited tensor {name!r} has shape {tuple(new.shape)}, stored {shape}")
            data = new.detach().to(device="cpu", dtype=_disk_dtype(stored["dtype"], torch)).contiguous()
            raw = data.reshape(-1).view(torch.uint8).numpy().tobytes()  # native order: little-endian, checked above
            begin, end = stored["data_offsets"]
            if end - begin != len(raw):
                raise CheckpointError(f"{src}: tensor {name!r} takes {end - begin} bytes on disk, edit has {len(raw)}")
            g.seek(8 + n + begin)
            g.write(raw)


def _disk_dtype(code: str, torch) -> Any:
    """The torch dtype of a safetensors dtype code (``F32``, ``BF16``, ...)."""
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if code not in table:
        raise CheckpointError(f"stored dtype {code} is not a float dtype zu can edit")
    return table[code]
