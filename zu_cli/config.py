"""Hyperparameters: one frozen dataclass, reference defaults (design §2), YAML overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import InputFileError


@dataclass(frozen=True)
class Hyper:
    """Every knob of the edit; defaults follow the reference unless noted.

    Context templates (§2.2): ``n_prefixes`` model-generated prefixes of ``prefix_len`` tokens.
    Neutral target (§2.3): ``z_optimizer`` for ``z_steps`` (Adam at ``z_lr``); the delta norm is clamped to
    ``z_clamp`` times the hidden state's norm; ``z_kl`` weights the KL term on "{subject} is a";
    ``z_weight_decay`` the delta's squared norm; stop early once the neutral target's mean
    probability reaches ``z_stop_prob`` (each request on its own); ``z_answer`` weights an
    unlikelihood term on the true answer's first token (0: off, the reference). ``z_optimizer``:
    ``adam`` (the reference) or ``lbfgs`` (a quasi-Newton step per request, ``z_steps`` passes at
    most, ``z_lr`` unused: about 40 % faster, fewer neighbours kept at 50 requests, docs/results.md). ``optim_dtype``: precision of
    the optimisation's forward passes (``auto``: bfloat16 autocast where the device does it fast);
    ``prefix_cache``: run the tokens before each lookup token once and keep their keys and values
    (they cannot change with the delta) instead of recomputing them every step (prefix.py);
    ``cache_targets``: keep each request's targets under ``ZU_CACHE_DIR/targets``, keyed by the
    weights, the request and these settings, and read them back in a later run (targets_cache.py);
    Requests are optimised in batches (memory grows with a batch, results do not change):
    ``batch_requests`` at a time, or with 0 as many as keep about ``activation_budget`` times the
    model's weight bytes for the backward pass (at least one request per batch).
    Sensitive vectors (§2.4): the same optimiser pushes toward the true target for
    ``sens_steps``; ``sensitive`` picks the vectors whose span P removes: ``pushed`` (the output
    plus the push, reference), ``delta`` (the push alone: the answer's direction), ``output``
    (the output alone, no optimisation) or ``auto`` (``pushed`` for the closed form, ``output``
    for --multi, where the push changed nothing measurable and costs half the targets stage);
    ``epsilon`` of the projector P = (1+eps) I - V V^T; ``project_general`` maps general keys to
    P W k (reference) rather than leaving them at W k.
    Closed form (§2.7): ``lambda_g``, ``lambda_f``, ``lambda_r``.
    Keep-constraints: the second moments of the ``--retain`` prompts (and of the forget requests'
    neighbours) join the general statistics with weight ``retain_weight`` per token (zu's addition).
    Entity keep-set: the second moments over the name tokens of ``entity_samples`` texts of
    ``entity_len`` tokens the model writes from name-eliciting seeds join G with weight
    ``entity_weight`` per token (closed form) and E[k k^T] with ``multi_entity_weight``
    (--multi: it also shrinks the null space); not computed when the variant's weight is 0.
    Subject-swap keep-set: each forget prompt with its subject replaced by ``swap_names`` names
    the model writes (``swap_texts`` texts sampled from the same seeds) stands in for unlisted
    neighbours; its second moments join G with ``swap_weight`` per token (closed form) and
    E[k k^T] with ``multi_swap_weight`` (--multi); both off by default (they weaken the re-mapping
    to EOS, docs/method.md; SmolLM2-135M's architecture entry pins the --multi one at 1), not
    computed when the variant's weight is 0.
    Similar-entity keep-set: each forget prompt with its subject replaced by up to
    ``similar_names`` entities the model lists after it (``similar_samples`` continuations of
    "1. {subject}\n2." of ``similar_len`` tokens); its second moments join G with
    ``similar_weight`` (closed form) and E[k k^T] with ``multi_similar_weight`` (--multi); both
    0 by default, --multi's calibrated edit sets 0.1 (docs/method.md).
    Statistics (§2.6): ``stats_samples`` texts of ``stats_len`` tokens sampled from the model
    when no corpus is given (``stats_max_tokens`` caps any corpus).
    --multi (§2.8): eigenvalues of E[k k^T] below ``null_threshold`` span the null space;
    ``solver`` ``gradient`` (Adam, ``multi_steps`` at ``multi_lr``, reference) or ``exact``
    (least squares); ``multi_sensitive_weight``, ``multi_target_weight`` and
    ``multi_norm_weight`` weight the loss's three terms; ``multi_general_weight`` adds
    E||dW k||^2 over general keys (zu's soft null space; 0 is the reference's loss).
    Guards: ``max_rel_change`` bounds ||dW||/||W|| per layer, ``max_cond`` the condition number.
    ``rounding``: how an edited tensor is cast back to a low-precision checkpoint dtype.
    ``quant_keys``: formats (comma-separated, e.g. ``Q4_0,bnb-nf4``; ``quantise.FORMATS``) whose
    round trip of the weights below and in the edited layers gives each forget prompt more keys,
    solved for the same edit, so that the forgetting holds on the checkpoint quantised that way
    (empty: off). ``z_quant``: formats whose round trip of the whole model each neutral target
    must also reach EOS on (every step a pass of each copy; empty: off).
    ``explicit`` (not a hyperparameter): the fields the user set (``--config``, CLI flags), which
    calibrated values never replace (``with_settings``).
    """

    n_prefixes: int = 5
    prefix_len: int = 10
    z_steps: int = 25
    z_lr: float = 0.1
    z_clamp: float = 0.75
    z_kl: float = 0.0625
    z_weight_decay: float = 0.5
    z_stop_prob: float = 0.95
    z_answer: float = 0.0
    z_quant: str = ""
    z_optimizer: str = "adam"
    optim_dtype: str = "auto"
    prefix_cache: bool = True
    cache_targets: bool = True
    batch_requests: int = 0
    activation_budget: float = 0.2
    sens_steps: int = 25
    sensitive: str = "auto"
    project_general: bool = False
    epsilon: float = 0.01
    lambda_g: float = 15000.0
    lambda_f: float = 50.0
    lambda_r: float = 1.0
    retain_weight: float = 1.0
    entity_weight: float = 1.0
    entity_samples: int = 320
    entity_len: int = 48
    swap_weight: float = 0.0
    swap_names: int = 8
    swap_texts: int = 256
    stats_samples: int = 200
    stats_len: int = 64
    stats_max_tokens: int = 100_000
    null_threshold: float = 2e-2
    solver: str = "gradient"
    multi_steps: int = 500
    multi_lr: float = 1e-3
    multi_sensitive_weight: float = 1.0
    multi_target_weight: float = 100.0
    multi_norm_weight: float = 0.1
    multi_general_weight: float = 0.0
    multi_entity_weight: float = 0.0
    multi_swap_weight: float = 0.0
    similar_weight: float = 0.0
    multi_similar_weight: float = 0.0
    similar_names: int = 8
    similar_samples: int = 2
    similar_len: int = 32
    max_rel_change: float = 1.5
    max_cond: float = 1e12
    rounding: str = "stochastic"
    quant_keys: str = ""
    seed: int = 0
    explicit: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def sensitive_kind(self, multi: bool, calibrated: str | None = None) -> str:
        """``sensitive`` with ``auto`` resolved.

        Args:
            multi: the --multi variant (``output``) rather than the closed form (``pushed``).
            calibrated: the kind the model's calibration chose for the edited window; it wins over
                the variant's default, never over an explicit setting.

        Returns:
            ``pushed``, ``delta`` or ``output``.
        """
        if self.sensitive != "auto":
            return self.sensitive
        return calibrated or ("output" if multi else "pushed")

    def to_dict(self) -> dict[str, Any]:
        """The resolved values, for the manifest."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "explicit"}

    def with_settings(self, values: dict[str, Any]) -> tuple["Hyper", list[str]]:
        """Apply values found by calibration where the user set nothing.

        Args:
            values: Hyper field -> value (a calibration profile's --multi settings).

        Returns:
            (the resolved Hyper, the names of the fields the values set, sorted).
        """
        applied = {k: v for k, v in values.items() if k not in self.explicit}
        return dataclasses.replace(self, **applied), sorted(applied)


def load_config(path: Path | None, **overrides: Any) -> Hyper:
    """Read ``--config`` YAML (a flat mapping of Hyper fields) and apply CLI overrides.

    Args:
        path: YAML file or None for the defaults.
        overrides: values from the command line; None entries are ignored.

    Returns:
        The resolved Hyper.

    Raises:
        InputFileError: unreadable/malformed YAML, an unknown key or a value of the wrong type (exit 2).
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise InputFileError(f"{path}: cannot read config: {str(exc).splitlines()[0]}") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise InputFileError(f"{path}: config must be a mapping of hyperparameter names to values")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(Hyper) if f.name != "explicit"}
    for key, val in values.items():
        if key not in fields:
            raise InputFileError(f"{path or 'config'}: unknown key {key!r}",
                                 hint="known keys: " + ", ".join(sorted(fields)))
        want = type(getattr(Hyper(), key))
        if want is float and isinstance(val, int) and not isinstance(val, bool):
            values[key] = float(val)
        elif not isinstance(val, want) or (want is int and isinstance(val, bool)):
            raise InputFileError(f"{path or 'config'}: field {key!r} must be {want.__name__}, got {val!r}")
    for key, allowed in (("rounding", ("stochastic", "nearest")), ("sensitive", ("auto", "pushed", "delta", "output")),
                         ("solver", ("gradient", "exact")),
                         ("z_optimizer", ("lbfgs", "adam")), ("optim_dtype", ("auto", "float32", "bfloat16"))):
        if key in values and values[key] not in allowed:
            raise InputFileError(f"{path or 'config'}: field {key!r} must be one of {', '.join(allowed)}")
    for key in ("quant_keys", "z_quant"):
        if values.get(key):
            from .quantise import FORMATS, format_list
            bad = [f for f in format_list(values[key]) if f not in FORMATS]
            if bad:
                raise InputFileError(f"{path or 'config'}: field {key!r} must list formats from "
                                     f"{', '.join(FORMATS)}, got {bad[0]!r}")
    for key, ok, what in (("batch_requests", lambda v: v >= 0, ">= 0 (0: by activation_budget)"),
                          ("activation_budget", lambda v: v > 0, "> 0"), ("retain_weight", lambda v: v >= 0, ">= 0"),
                          ("entity_weight", lambda v: v >= 0, ">= 0"), ("multi_entity_weight", lambda v: v >= 0, ">= 0"),
                          ("entity_samples", lambda v: v > 0, "> 0"),
                          ("entity_len", lambda v: v > 0, "> 0"), ("swap_weight", lambda v: v >= 0, ">= 0"),
                          ("multi_swap_weight", lambda v: v >= 0, ">= 0"), ("swap_names", lambda v: v > 0, "> 0"),
                          ("swap_texts", lambda v: v > 0, "> 0"), ("similar_weight", lambda v: v >= 0, ">= 0"),
                          ("multi_similar_weight", lambda v: v >= 0, ">= 0"), ("similar_names", lambda v: v > 0, "> 0"),
                          ("similar_samples", lambda v: v > 0, "> 0"), ("similar_len", lambda v: v > 0, "> 0")):
        if key in values and not ok(values[key]):
            raise InputFileError(f"{path or 'config'}: field {key!r} must be {what}, got {values[key]!r}")
    return Hyper(**values, explicit=frozenset(values))
