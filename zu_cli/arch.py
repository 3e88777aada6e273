"""Architectures as data: one YAML file per model family under ``architectures/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from .errors import CheckpointError, UsageError


@dataclass(frozen=True)
class ArchSpec:
    """What a model family is, as zu needs to know it; never guessed from tensor shapes, never a
    setting tuned on one model (those come from calibration, calibrate.py).

    Attributes:
        name: family name (file stem).
        model_types: config ``model_type`` values served.
        architectures: config ``architectures`` class names served.
        layers: module path template of the decoder layers' container, e.g. ``model.layers``.
        down_proj: module path of the MLP down-projection relative to a layer, e.g. ``mlp.down_proj``.
        transposed: True when the weight is stored (d_ff, d_model) as in GPT-2's Conv1D.
        bias: whether the down-projection carries a bias.
        num_layers_key: config attribute holding the layer count.
        final_norm, lm_head, embed: module paths.
        mlp_output: ``residual`` when the down-projection's output is added to the residual stream
            as it is, ``normed`` when a norm comes between (Gemma 2/3's post-feedforward norm):
            then the edit's targets are found at the down-projections themselves (edit.py).
        refuse_if: config values under which zu cannot edit this family correctly (refused, exit 3).
        parallel_mlp: True when the MLP reads the block's input in parallel with attention (GPT-J), or
            the config flag that says so (GPT-NeoX's ``use_parallel_residual``); False otherwise.
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layers: str
    down_proj: str
    transposed: bool
    bias: bool
    num_layers_key: str
    final_norm: str
    lm_head: str
    embed: str
    mlp_output: str = "residual"
    refuse_if: dict[str, Any] = field(default_factory=dict)
    parallel_mlp: bool | str = False

    def first_window_layer(self, config: Any) -> int:
        """The lowest layer an edit window may hold. Where the MLP reads the block's input in parallel
        with attention, layer 0's MLP sees at the prompt's last token nothing but that token's own
        embedding: its key is the same for every prompt ending in that token, and an edit there
        forgets them all (measured on the GPT-NeoX fact model: 3 of 9 kept city facts lost)."""
        flag = self.parallel_mlp
        parallel = bool(getattr(_text_config(config), flag, True)) if isinstance(flag, str) else flag
        return 1 if parallel else 0

    def down_proj_module(self, layer: int) -> str:
        """Module name of layer ``layer``'s down-projection, e.g. ``model.layers.17.mlp.down_proj``."""
        return f"{self.layers}.{layer}.{self.down_proj}"

    def down_proj_weight(self, layer: int) -> str:
        """State-dict key of that down-projection's weight."""
        return self.down_proj_module(layer) + ".weight"

    def layer_module(self, layer: int) -> str:
        """Module name of decoder layer ``layer``."""
        return f"{self.layers}.{layer}"


def _load_all() -> list[ArchSpec]:
    specs = []
    for entry in sorted(resources.files("zu_cli.architectures").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        raw: dict[str, Any] = yaml.safe_load(entry.read_text())
        specs.append(ArchSpec(
            name=entry.name[:-5], model_types=tuple(raw["model_types"]), architectures=tuple(raw["architectures"]),
            layers=raw["layers"], down_proj=raw["down_proj"], transposed=bool(raw.get("transposed", False)),
            bias=bool(raw.get("bias", False)), num_layers_key=raw["num_layers_key"], final_norm=raw["final_norm"],
            lm_head=raw["lm_head"], embed=raw["embed"], mlp_output=raw.get("mlp_output", "residual"),
            refuse_if=dict(raw.get("refuse_if") or {}), parallel_mlp=raw.get("parallel_mlp", False)))
    return specs


def supported() -> list[str]:
    """Names of every supported family."""
    return [s.name for s in _load_all()]


def lookup(config: Any) -> ArchSpec:
    """Find the ArchSpec for a transformers config.

    Args:
        config: a ``PretrainedConfig`` (or anything with ``architectures`` / ``model_type``).

    Returns:
        The matching ArchSpec.

    Raises:
        CheckpointError: no family serves this architecture, or its config has a structure the family
            refuses (``refuse_if``) (exit 3), naming the supported list.
    """
    specs = _load_all()
    model_type = getattr(config, "model_type", None)
    found = [s for cls in getattr(config, "architectures", None) or [] for s in specs if cls in s.architectures]
    found += [s for s in specs if model_type in s.model_types]
    if found:
        spec = found[0]
        for key, bad in spec.refuse_if.items():
            if getattr(_text_config(config), key, None) == bad:
                raise CheckpointError(f"{spec.name} with {key}={bad!r}: zu cannot edit this block structure correctly "
                                      "(the MLP's output does not join an additive residual stream)",
                                      hint="nothing was written; see docs/cli.md, 'Supported architectures'")
        return spec
    raise CheckpointError(
        f"unsupported architecture {getattr(config, 'architectures', None) or model_type!r}",
        hint="supported families: " + ", ".join(s.name for s in specs))


def _text_config(config: Any) -> Any:
    """The language model's own config (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(spec: ArchSpec, config: Any) -> int:
    """Layer count read from the config key the architecture names."""
    return int(getattr(_text_config(config), spec.num_layers_key))


def parse_layers(text: str | None) -> list[int] | str | None:
    """``--layers`` syntax, checked before anything is loaded: ``8,9,10``, ``8-10``, ``6-8,10`` or ``auto``.

    Returns:
        Ascending distinct layer numbers, ``"auto"``, or None when ``text`` is empty (the default window).

    Raises:
        UsageError: malformed text (exit 2).
    """
    if text is None or not text.strip():
        return None
    if text.strip().lower() == "auto":
        return "auto"
    layers: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError as exc:
            raise UsageError(f"--layers {text!r}: cannot read {part!r}",
                             hint="layer numbers and ranges, e.g. 8,9,10 or 8-10, or auto") from exc
        if first < 0 or last < first:
            raise UsageError(f"--layers {text!r}: {part!r} is not an ascending range of layer numbers")
        layers.update(range(first, last + 1))
    return sorted(layers)


def check_layers(layers: list[int], n_layers: int) -> list[int]:
    """Explicit ``--layers`` against the model's depth.

    Raises:
        UsageError: a layer outside the model (exit 2).
    """
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise UsageError(f"--layers: layer {bad[0]} outside the model (0-{n_layers - 1})")
    return layers
