"""Self-calibration (issue 25): the settings a model gets, found on the model itself before its first
edit, cached by its weights' fingerprint.

1. Probe facts: zu's common-knowledge set (data/calibration.json), kept where the model answers;
   an edit set of ``N_EDIT`` facts across relations, the rest as neighbours.
2. Causal tracing on the edit set (locate.py): where the facts are recalled.
3. Candidate windows of ``WIDTH`` layers: the traced window and windows ending at fixed relative
   depths; each is really edited (closed form, in memory) and scored on the forgotten facts,
   their paraphrases, the neighbours and perplexity (probefacts.score). The best wins.
4. The sensitive-vector kind (``output`` or ``pushed``) on that window, the same way.
5. ``--multi`` (only when asked): its window (``MULTI_WIDTH`` layers from the traced window's first
   layer; without a traced window the chosen one extended ``MULTI_EXTRA`` layers down) and its soft
   null-space weight, among ``MULTI_GENERAL``, on a larger edit (``probefacts.multi_edit_size``).

No request text of the user's enters calibration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import Hyper
from .console import Output, silent
from .errors import NumericalError
from .windows import WIDTH, candidate_windows, multi_window

VERSION = 5  # 5: --multi's window starts at the traced layers; its weight is chosen on 24 facts
MIN_KNOWN = 4  # probe facts the model must answer for calibration to mean anything
# Context templates while calibrating: candidates are compared with each other, on one template
# besides the bare prompt, for a third of the cost of the edit's five (the edit keeps its own).
CAL_PREFIXES = 1
MULTI_GENERAL = (1e4, 1e5, 1e6)
# --multi's edit besides its weight: the exact solve and the keep-sets (docs/method.md). A profile
# cached before a key was added here gets the key from here (``settings``).
MULTI_BASE = {"solver": "exact", "multi_entity_weight": 1.0, "multi_swap_weight": 1.0, "multi_similar_weight": 0.1}


class CalibrationUnavailable(Exception):
    """The model knows too few of zu's probe facts to calibrate on (a toy model, another language)."""


@dataclass
class Profile:
    """What calibration chose for one model, and the figures that chose it.

    Attributes:
        fingerprint: digest of the model's files (the cache key).
        layers: the closed form's window.
        sensitive: the closed form's sensitive-vector kind.
        multi_layers: --multi's window.
        multi: --multi's hyperparameters (Hyper fields), or None until a --multi calibration ran.
        figures: per candidate its layers, settings and scores; the tracing; the probe facts used.
        seconds: how long calibration took.
    """

    fingerprint: str
    layers: list[int]
    sensitive: str
    multi_layers: list[int]
    multi: dict[str, Any] | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    version: int = VERSION

    def summary(self) -> dict[str, Any]:
        """The profile without its figures (for the manifest)."""
        return {k: v for k, v in asdict(self).items() if k != "figures"}


def profile_path(fingerprint: str):
    """Where a model's profile is cached."""
    from .stats import cache_dir

    return cache_dir() / "calibration" / f"{fingerprint[:32]}-v{VERSION}.json"


def load_profile(fingerprint: str) -> Profile | None:
    """The cached profile of these weights, or None (absent, damaged or of another version)."""
    try:
        doc = json.loads(profile_path(fingerprint).read_text())
        prof = Profile(**doc)
    except (OSError, ValueError, TypeError):
        return None
    return prof if prof.fingerprint == fingerprint and prof.version == VERSION else None


def store_profile(prof: Profile) -> None:
    """Write the profile to the cache atomically."""
    path = profile_path(prof.fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(prof), indent=1, sort_keys=True))
    os.replace(tmp, path)


class Calibrator:
    """One model under calibration: its probe facts, the unedited numbers, and edits of candidates."""

    def __init__(self, ckpt, model, tok, source: str, out: Output):
        from .arch import num_layers
        from .edit import context_templates
        from .probefacts import N_EDIT, known_facts, ppl_text

        self.ckpt, self.model, self.tok, self.spec, self.source, self.out = ckpt, model, tok, ckpt.spec, source, out
        self.n_layers = num_layers(self.spec, ckpt.config)
        self.hp = Hyper(n_prefixes=CAL_PREFIXES)
        with out.stage("calibration: the facts this model knows"):
            self.known = known_facts(model, tok)
        if len(self.known) < MIN_KNOWN:
            raise CalibrationUnavailable(f"{ckpt.name} answers {len(self.known)} of zu's probe facts (calibration "
                                         f"needs {MIN_KNOWN})")
        self.text = ppl_text()
        self.templates = context_templates(model, tok, self.hp)
        self._targets: dict[tuple, tuple] = {}
        self.resize(N_EDIT)

    def resize(self, n_edit: int) -> None:
        """Edit ``n_edit`` probe facts from now on (the rest up to ``N_NEIGHBOURS`` are the neighbours)."""
        from .probefacts import measure, split

        self.edit, self.neighbours = split(self.known, n_edit)
        self.requests = [f.request() for f in self.edit]
        self.base = measure(self.model, self.tok, self.edit, self.neighbours, self.text)
        self._targets.clear()

    def warm_statistics(self, layers: list[int], multi: bool = False) -> None:
        """Compute (or read) the statistics of every layer calibration may edit, in one pass."""
        from .keep import solve_moments
        from .update import read_weights

        _, _, biases = read_weights(self.ckpt, self.spec, layers)
        hp = dataclasses.replace(self.hp, **MULTI_BASE) if multi else self.hp
        solve_moments(self.model, self.tok, self.spec, layers, biases, hp, None, self.source, [], self.out,
                      keys=multi, closed=not multi, requests=self.requests)

    def evaluate(self, layers: list[int], sensitive: str, hp: Hyper, multi: bool = False) -> dict[str, Any]:
        """Edit the probe facts at ``layers`` in memory and score the result (probefacts.score)."""
        from .edit import edit_targets
        from .keep import solve_moments
        from .probefacts import measure, score
        from .text import neutral_ids
        from .update import applied, closed_form_solver, edit_layers, multi_solver, read_weights

        quiet = silent()
        _, weights, biases = read_weights(self.ckpt, self.spec, layers)
        key = (tuple(layers), sensitive)
        if key not in self._targets:  # targets depend on the window and kind, not on the solver's weights
            self._targets[key] = edit_targets(self.model, self.tok, self.spec, self.requests, layers, self.templates,
                                              neutral_ids(self.tok, self.requests, "eos"), hp, sensitive, quiet)
        z, _, sens = self._targets[key]
        g, kk, _ = solve_moments(self.model, self.tok, self.spec, layers, biases, hp, None, self.source, [], quiet,
                                 keys=multi, closed=not multi, requests=self.requests)
        solver = multi_solver(kk, hp) if multi else closed_form_solver(g, hp)
        try:
            ups = edit_layers(self.model, self.tok, self.spec, self.requests, layers, weights, biases, z, sens,
                              self.templates, hp, solver, quiet)
        except NumericalError as exc:
            return {"error": exc.message, "misses": 9, "utility": -1e9}
        with applied(self.model, self.spec, {u.layer: u.new for u in ups}, biases):
            after = measure(self.model, self.tok, self.edit, self.neighbours, self.text)
        return {**score(after, self.base), "rel_change": round(max(u.rel_change for u in ups), 4)}


def calibrate(ckpt, model, tok, source: str, out: Output, multi: bool = False,
              prior: Profile | None = None) -> Profile:
    """Find the profile of a model (module docstring); with ``multi`` also --multi's settings.

    Args:
        ckpt, model, tok: the opened checkpoint and the loaded (unedited) model.
        source: the weights' fingerprint.
        out: progress and one line per candidate.
        multi: calibrate --multi too.
        prior: a cached profile without --multi settings: its closed-form part is kept.

    Returns:
        The Profile (not yet stored).

    Raises:
        CalibrationUnavailable: the model answers too few probe facts to calibrate on.
    """
    from .locate import TraceSettings, locate
    from .probefacts import multi_edit_size, multi_rank_key, rank_key

    t0 = time.perf_counter()
    cal = Calibrator(ckpt, model, tok, source, out)
    figures = dict(prior.figures) if prior else {}
    figures.update(known_facts=len(cal.known), edit_facts=[f.id for f in cal.edit], neighbours=len(cal.neighbours))
    if prior is None:
        scores, _ = locate(model, tok, cal.spec, cal.n_layers, cal.requests, TraceSettings(), WIDTH, source, out)
        figures["tracing"] = {"effect": [round(e, 5) for e in scores.effect], "window": scores.window,
                              "found": scores.found}
        wins = candidate_windows(cal.n_layers, scores.window, first=cal.spec.first_window_layer(ckpt.config))
        cal.warm_statistics(sorted({l for w in wins for l in w}))
        cands = []
        with out.progress("calibration: candidate windows", len(wins) + 1) as advance:
            for w in wins:
                cands.append({"layers": w, "sensitive": "output", **cal.evaluate(w, "output", cal.hp)})
                _say(out, cands[-1])
                advance()
            best = min(cands, key=rank_key)
            cands.append({"layers": best["layers"], "sensitive": "pushed",
                          **cal.evaluate(best["layers"], "pushed", cal.hp)})
            _say(out, cands[-1])
            advance()
        best = min(cands, key=rank_key)
        figures["candidates"] = cands
        layers, sensitive = best["layers"], best["sensitive"]
    else:
        layers, sensitive = prior.layers, prior.sensitive
    tracing = figures.get("tracing", {})
    mlayers = multi_window(layers, cal.spec.first_window_layer(ckpt.config),
                           tracing.get("window") if tracing.get("found") else None, cal.n_layers)
    multi_hp = None
    if multi:
        cal.resize(multi_edit_size(len(cal.known)))
        figures["multi_edit_facts"] = [f.id for f in cal.edit]
        cal.warm_statistics(mlayers, multi=True)
        mcands = []
        with out.progress("calibration: --multi settings", len(MULTI_GENERAL)) as advance:
            for gw in MULTI_GENERAL:
                hp = dataclasses.replace(cal.hp, multi_general_weight=gw, **MULTI_BASE)
                mcands.append({"layers": mlayers, "multi_general_weight": gw,
                               **cal.evaluate(mlayers, "output", hp, multi=True)})
                _say(out, mcands[-1])
                advance()
        figures["multi_candidates"] = mcands
        multi_hp = {**MULTI_BASE, "multi_general_weight": min(mcands, key=multi_rank_key)["multi_general_weight"]}
    seconds = round(time.perf_counter() - t0 + (prior.seconds if prior else 0.0), 1)
    return Profile(fingerprint=source, layers=layers, sensitive=sensitive, multi_layers=mlayers, multi=multi_hp,
                   figures=figures, seconds=seconds)


def _say(out: Output, c: dict[str, Any]) -> None:
    what = f"layers {c['layers'][0]}-{c['layers'][-1]}" + (f", {c['sensitive']}" if "sensitive" in c else "") + \
        (f", general weight {c['multi_general_weight']:g}" if "multi_general_weight" in c else "")
    if "error" in c:
        out.info(f"  {what}: {c['error']}")
    else:
        out.info(f"  {what}: forgotten {c['forgotten']:.0%}, paraphrases {c['paraphrases']:.0%}, neighbours "
                 f"{c['neighbours']:.0%}, perplexity x{c['ppl']:.3f}, EOS top-10 {c['neutral']:.0%}")


def ensure_profile(ckpt, model, tok, source: str, out: Output, multi: bool = False) -> tuple[Profile, bool]:
    """The model's profile from the cache, or calibrated now (and cached); --multi's part added when needed.

    Returns:
        (profile, whether it came from the cache as it is).
    """
    prof = load_profile(source)
    if prof is not None and (prof.multi is not None or not multi):
        return prof, True
    out.info(f"calibrating {ckpt.name} (once per model; cached): the settings come from facts it knows")
    prof = calibrate(ckpt, model, tok, source, out, multi=multi, prior=prof)
    store_profile(prof)
    return prof, False


def settings(prof: Profile | None, layers: list[int], hp: Hyper, multi: bool) -> tuple[Hyper, list[str], str]:
    """What the profile sets for the window being edited, where the user set nothing.

    Args:
        prof: the model's profile, or None (``--no-calibrate``, explicit ``--layers``).
        layers: the window being edited; the profile's settings hold for its own window only.
        hp: the user's Hyper (its ``explicit`` fields are never replaced).
        multi: the --multi variant.

    Returns:
        (resolved Hyper, names of the fields calibration set, sensitive kind).
    """
    applied: list[str] = []
    kind = None
    if prof is not None and multi and prof.multi and layers == prof.multi_layers:
        hp, applied = hp.with_settings({**MULTI_BASE, **prof.multi})
    if prof is not None and not multi and layers == prof.layers:
        kind = prof.sensitive
        if hp.sensitive == "auto":
            applied = ["sensitive"]
    return hp, applied, hp.sensitive_kind(multi, kind)
