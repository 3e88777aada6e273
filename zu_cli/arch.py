"""Architectures as data: one YAML file per model family under ``architectures/``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from .errors import CheckpointError, UsageError


@dataclass(frozen=True)
class ArchSpec:
    """What zu needs to know about a model family; never guessed from tensor shapes.

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
        default_window: relative (start, end) depth of the default edit window, inclusive,
            as fractions of the layer count; known models may pin layers in ``known``.
        known: mapping of a model signature ("layers x hidden") to a pinned layer list.
        known_sensitive: for some of those signatures, the sensitive-vector kind measured best
            with the pinned window (``Hyper.sensitive``); used only when that window is edited.
        known_multi: for some signatures, what was measured best for --multi: its own window
            (``layers``) and hyperparameters (``hyper``, Hyper fields), used only when that
            window is edited and never over a value the user set.
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
    default_window: tuple[float, float]
    known: dict[str, tuple[int, ...]]
    known_sensitive: dict[str, str]
    known_multi: dict[str, dict[str, Any]]

    def down_proj_module(self, layer: int) -> str:
        """Module name of layer ``layer``'s down-projection, e.g. ``model.layers.17.mlp.down_proj``."""
        return f"{self.layers}.{layer}.{self.down_proj}"

    def down_proj_weight(self, layer: int) -> str:
        """State-dict key of that down-projection's weight."""
        return self.down_proj_module(layer) + ".weight"

    def layer_module(self, layer: int) -> str:
        """Module name of decoder layer ``layer``."""
        return f"{self.layers}.{layer}"

    def pinned_sensitive(self, num_layers: int, hidden: int, layers: list[int]) -> str | None:
        """The sensitive-vector kind a known model's entry pins for its window, or None.

        Args:
            num_layers, hidden: the model's signature.
            layers: the layers being edited; another window than the pinned one gets None, as
                the kind was measured for that window only.

        Returns:
            ``pushed``, ``delta``, ``output`` or None.
        """
        sig = f"{num_layers}x{hidden}"
        return self.known_sensitive.get(sig) if list(self.known.get(sig, ())) == list(layers) else None

    def pinned_multi(self, num_layers: int, hidden: int, layers: list[int]) -> dict[str, Any]:
        """The --multi hyperparameters a known model's entry pins for its --multi window, or {}.

        Args:
            num_layers, hidden: the model's signature.
            layers: the layers being edited; another window gets {} (measured for that one only).

        Returns:
            Hyper field -> value.
        """
        entry = self.known_multi.get(f"{num_layers}x{hidden}", {})
        return dict(entry.get("hyper", {})) if list(entry.get("layers", ())) == list(layers) else {}

    def default_layers(self, num_layers: int, hidden: int, width: int = 3, multi: bool = False) -> list[int]:
        """The default edit window for a model of this family.

        Args:
            num_layers: number of decoder layers.
            hidden: model width (part of the known-model signature).
            width: number of consecutive layers.
            multi: the window for --multi (a known model may pin its own).

        Returns:
            Layer indices, ascending.
        """
        sig = f"{num_layers}x{hidden}"
        if multi and self.known_multi.get(sig, {}).get("layers"):
            return list(self.known_multi[sig]["layers"])
        pinned = self.known.get(sig)
        if pinned:
            return list(pinned)
        # Relative depth of the reference's Llama-3.2-3B window (16-18 of 28 layers), keeping at
        # least 30 % of the layers above it: the neutral target is written at the subject token
        # and only later layers can carry it to the position that predicts the answer.
        start = int(round(self.default_window[0] * num_layers))
        end = min(start + width, num_layers - math.ceil(0.3 * num_layers))
        start = max(0, min(start, end - width))
        return list(range(start, max(end, start + 1)))


def _load_all() -> list[ArchSpec]:
    specs = []
    for entry in sorted(resources.files("zu_cli.architectures").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        raw: dict[str, Any] = yaml.safe_load(entry.read_text())
        known = raw.get("known") or {}  # signature -> layer list, or {layers: [...], sensitive: kind}
        specs.append(ArchSpec(
            name=entry.name[:-5], model_types=tuple(raw["model_types"]), architectures=tuple(raw["architectures"]),
            layers=raw["layers"], down_proj=raw["down_proj"], transposed=bool(raw.get("transposed", False)),
            bias=bool(raw.get("bias", False)), num_layers_key=raw["num_layers_key"], final_norm=raw["final_norm"],
            lm_head=raw["lm_head"], embed=raw["embed"], default_window=tuple(raw["default_window"]),
            known={k: tuple(v["layers"] if isinstance(v, dict) else v) for k, v in known.items()},
            known_sensitive={k: v["sensitive"] for k, v in known.items() if isinstance(v, dict) and "sensitive" in v},
            known_multi={k: v["multi"] for k, v in known.items() if isinstance(v, dict) and "multi" in v}))
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
        CheckpointError: no family serves this architecture (exit 3), naming the supported list.
    """
    specs = _load_all()
    for cls in getattr(config, "architectures", None) or []:
        for s in specs:
            if cls in s.architectures:
                return s
    model_type = getattr(config, "model_type", None)
    for s in specs:
        if model_type in s.model_types:
            return s
    raise CheckpointError(
        f"unsupported architecture {getattr(config, 'architectures', None) or model_type!r}",
        hint="supported families: " + ", ".join(s.name for s in specs))


def _text_config(config: Any) -> Any:
    """The language model's own config (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(spec: ArchSpec, config: Any) -> int:
    """Layer count read from the config key the architecture names."""
    return int(getattr(_text_config(config), spec.num_layers_key))


def hidden_size(config: Any) -> int:
    """Model width from the config (0 when it has none): the second half of a known-model signature."""
    return int(getattr(_text_config(config), "hidden_size", 0) or 0)


def known_settings(spec, config, n_layers: int, layers: list[int], hp, multi: bool) -> tuple[Any, list[str], str]:
    """What a known model's entry sets for the window being edited: --multi's pinned
    hyperparameters (where the user set nothing) and the sensitive-vector kind.

    Args:
        hp: the user's Hyper (its ``explicit`` fields are never replaced).
        multi: the --multi variant (only it takes ``pinned_multi``).

    Returns:
        (resolved Hyper, names of the fields the pins set, sensitive kind).
    """
    hidden = hidden_size(config)
    pinned: list[str] = []
    if multi:
        hp, pinned = hp.with_pins(spec.pinned_multi(n_layers, hidden, layers))
    return hp, pinned, hp.sensitive_kind(multi, spec.pinned_sensitive(n_layers, hidden, layers))


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


def resolve_layers(text: str | None, spec, config, n_layers: int, multi: bool = False) -> tuple[list[int], str]:
    """``--layers 17,18,19`` (or ``17-19``) or the architecture's default window (for --multi when ``multi``).

    Raises:
        UsageError: malformed list or a layer outside the model (exit 2).
    """
    layers = parse_layers(text)
    if layers is None or layers == "auto":
        return spec.default_layers(n_layers, hidden_size(config), multi=multi), "architecture default"
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise UsageError(f"--layers: layer {bad[0]} outside the model (0-{n_layers - 1})")
    return layers, "--layers"
