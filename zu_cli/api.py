"""zu from Python: the pipeline the CLI runs, with typed arguments and results, for notebooks and
for pipelines written in Python.

Example (docs/python.md; a test runs it verbatim)::

    from zu_cli import unlearn, verify

    result = unlearn("./ckpt", "forget.jsonl", "./ckpt-clean")
    result.counts                 # {'forgotten': 1, 'still_recalled': 0, ...}
    report = verify("./ckpt-clean", forget="forget.jsonl")
    assert report.exit_code == 0  # 0 pass, 1 a probe failed, 4 integrity

Errors are the CLI's: ``zu_cli.errors.ZuError`` subclasses whose ``exit_code`` is the documented one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .console import Output


def _output(progress: bool) -> Output:
    from .console import silent

    return Output() if progress else silent()


def unlearn(model: str | Path, forget: str | Path, out: str | Path, *, layers: str | None = None,
            multi: bool = False, key: str | Path | None = None, signer: Any = None, retain: str | Path | None = None,
            previous: list[str | Path] = (), base: str | Path | None = None,
            config: str | Path | dict[str, Any] | None = None, seed: int | None = None, force: bool = False,
            calibrate: bool = True, card: bool = True, device_map: str = "auto", dtype: str = "auto",
            progress: bool = False):
    """Edit ``model`` so it forgets the requests in ``forget``; write ``out`` with its signed manifest.

    Args:
        model: a checkpoint folder or a hub id ``org/name[@revision]``.
        forget: the requests (.jsonl or .yaml, docs/requests.md).
        out: the output folder (written atomically; ``force`` replaces an earlier zu output).
        layers: ``"8-10"``, ``"8,9,10"`` or ``"auto"``; default: the model's calibrated window.
        multi: the gradient variant for many requests.
        key: private key file; default ``$ZU_SIGNING_KEY``, else the ``zu keygen`` key.
        signer: a ``keys.SigningKey`` instead of ``key`` (e.g. ``keys.ephemeral()``).
        retain: facts to keep (request format).
        previous: earlier rounds' request files (``--previous``).
        base: the chain's original checkpoint, to re-edit with every request so far (``--base``).
        config: hyperparameters: a YAML file or a dict of the same keys (docs/method.md).
        seed: the run's seed.
        calibrate: find the model's own settings when ``layers`` is not given.
        card: write or update the output's model card.
        device_map, dtype: as the CLI's ``--device-map`` and ``--dtype``.
        progress: show the CLI's progress on stderr.

    Returns:
        A ``pipeline.UnlearnResult`` (``out``, ``layers``, ``counts``, ``requests``, ``keyid``, ``receipt``, ...).

    Raises:
        ZuError: bad input (2), checkpoint (3), numerical failure (5), output not writable (6).
    """
    from .config import load_config
    from .pipeline import UnlearnOptions, run_unlearn

    hp = _hyper(config, seed, load_config)
    opts = UnlearnOptions(model=model, forget=Path(forget), out=Path(out), layers=layers, multi=multi,
                          key=Path(key) if key else None, signer=signer, retain=Path(retain) if retain else None,
                          previous=[Path(p) for p in previous], base=Path(base) if base else None, force=force,
                          calibrate=calibrate, card=card, device_map=device_map, dtype=dtype)
    return run_unlearn(opts, hp, _output(progress))


def verify(model: str | Path, *, forget: str | Path | None = None, public_key: str | Path | None = None,
           require_key: bool = False, baseline: str | Path | None = None, retain: str | Path | None = None,
           device_map: str = "auto", dtype: str = "auto", progress: bool = False):
    """Check the signed manifest (and the history chain), then probe the requests in ``forget``.

    Returns:
        A ``verdicts.VerifyReport``: ``exit_code`` (0 pass, 1 a probe failed, 4 integrity),
        ``integrity`` (problems, signer, links), ``requests``, ``metrics``; ``to_json()`` as ``--json``.

    Raises:
        ZuError: bad input (2) or an unreadable checkpoint (3).
    """
    from .pipeline_verify import VerifyOptions, run_verify

    opts = VerifyOptions(model=model, forget=Path(forget) if forget else None,
                         public_key=Path(public_key) if public_key else None, require_key=require_key,
                         baseline=baseline, retain=Path(retain) if retain else None, device_map=device_map,
                         dtype=dtype)
    return run_verify(opts, _output(progress))


def _hyper(config, seed, load_config):
    """Hyperparameters from a YAML path or a dict of the same keys (validated the same way)."""
    if isinstance(config, dict):
        return load_config(None, **config, seed=seed)
    return load_config(Path(config) if config else None, seed=seed)
