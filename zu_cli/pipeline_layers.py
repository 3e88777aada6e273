"""Where to edit: the window ``zu unlearn`` edits (as asked, calibrated or traced), and the runs
behind ``zu locate`` (causal tracing) and ``zu calibrate`` (the model's own settings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import Hyper
from .console import Output
from .errors import UsageError


def choose_layers(asked, ckpt, model, tok, n_layers: int, requests, hp: Hyper, source: str, opts,
                  out: Output) -> tuple[list[int], str, dict[str, Any] | None, Any]:
    """The edited window of ``zu unlearn`` (``opts``: pipeline.UnlearnOptions): ``--layers`` as given; ``auto``: causal tracing on the requests; else the
    model's calibrated window (calibrating it now if this model was never calibrated), or with
    ``--no-calibrate`` the default relative window.

    Returns:
        (layers, how they were chosen, the tracing record or None, the calibration Profile or None).
    """
    from .calibrate import CalibrationUnavailable, ensure_profile
    from .windows import default_window, multi_window

    if isinstance(asked, list):
        return asked, "--layers", None, None
    first = ckpt.spec.first_window_layer(ckpt.config)
    default = default_window(n_layers, first=first)
    if opts.multi:
        default = multi_window(default, first)
    if asked is None and opts.calibrate:
        try:
            prof, cached = ensure_profile(ckpt, model, tok, source, out, multi=opts.multi)
        except CalibrationUnavailable as exc:
            out.warn(f"{exc}: editing the default window {default} (pass --layers to choose)")
            return default, "default window (calibration unavailable)", None, None
        return (prof.multi_layers if opts.multi else prof.layers), \
            "calibration" + (" (cached)" if cached else ""), None, prof
    if asked is None:
        return default, "default window (--no-calibrate)", None, None
    from .locate import TraceSettings, locate

    st = TraceSettings(seed=hp.seed)
    scores, _ = locate(model, tok, ckpt.spec, n_layers, requests, st, len(default), source, out)
    record = {"effect": [round(e, 5) for e in scores.effect], "window": scores.window, "settings": asdict(st),
              "requests_traced": len(scores.traced), "found": scores.found}
    if not scores.found:
        out.warn(f"--layers auto: causal tracing found no causal effect ({scores.reason}); editing the default "
                 f"window {default}")
        return default, "default (causal tracing found no effect)", record, None
    return scores.window, "auto (causal tracing)", record, None


@dataclass
class LocateOptions:
    """What ``zu locate`` was asked to do."""

    model: str | Path
    forget: Path
    num_layers: int = 3
    settings: Any = None  # locate.TraceSettings; None = defaults
    device_map: str = "auto"
    dtype: str = "auto"


def run_locate(opts: LocateOptions, out: Output):
    """Causal tracing of the requests on the checkpoint; the suggested window of ``num_layers`` layers.

    Returns:
        (LayerScores with a redacted ``tag`` per request, whether they came from the cache).
    """
    from . import manifest
    from .arch import num_layers
    from .checkpoint import open_checkpoint
    from .loading import check_load_options, load_model
    from .locate import TraceSettings, locate
    from .requests import load_requests

    check_load_options(opts.device_map, opts.dtype)
    requests = load_requests(opts.forget)
    with out.stage("opening the checkpoint"):
        ckpt = open_checkpoint(opts.model)
    n_layers = num_layers(ckpt.spec, ckpt.config)
    if not 1 <= opts.num_layers <= n_layers:
        raise UsageError(f"--num-layers {opts.num_layers}: expected 1-{n_layers}")
    with out.stage("loading the model"):
        model, tok = load_model(ckpt, opts.device_map, None, None, opts.dtype)
    source = manifest.sha256_file_list(manifest.dir_digests(ckpt.path))
    scores, cached = locate(model, tok, ckpt.spec, n_layers, requests, opts.settings or TraceSettings(),
                            opts.num_layers, source, out)
    by_id = {r.id: r for r in requests}
    for q in scores.requests:
        q["tag"] = out.redact(by_id[q["id"]].target, q["id"])
    return scores, cached


def run_calibrate(model: str | Path, multi: bool, force: bool, device_map: str, dtype: str, out: Output):
    """``zu calibrate``: the model's profile from the cache, or calibrated now (and cached).

    Returns:
        (Profile, whether it came from the cache).

    Raises:
        ZuError subclasses: bad options (2), an unreadable model or too few known facts (3).
    """
    from . import manifest
    from .calibrate import CalibrationUnavailable, calibrate, ensure_profile, store_profile
    from .errors import CheckpointError
    from .checkpoint import open_checkpoint
    from .loading import check_load_options, load_model

    check_load_options(device_map, dtype)
    with out.stage("opening the checkpoint"):
        ckpt = open_checkpoint(model)
    with out.stage("loading the model"):
        mdl, tok = load_model(ckpt, device_map, None, None, dtype)
    with out.stage("fingerprinting the weights"):
        source = manifest.sha256_file_list(manifest.dir_digests(ckpt.path))
    try:
        if not force:
            return ensure_profile(ckpt, mdl, tok, source, out, multi=multi)
        prof = calibrate(ckpt, mdl, tok, source, out, multi=multi)
    except CalibrationUnavailable as exc:
        raise CheckpointError(str(exc), hint="edit with --layers (zu locate suggests a window)") from exc
    store_profile(prof)
    return prof, False
