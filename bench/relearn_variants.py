"""Two method variants tried against relearning (issue 26), as patches around bench/quality.py.

    python bench/relearn_variants.py first-keys  [bench/quality.py args...]
    SIGMA=0.2 python bench/relearn_variants.py upper-noise [bench/quality.py args...]

``first-keys``: each request also gets its key at the subject's first token (averaged over the
context templates like the last token's; a one-token subject repeats its key), asked for the same
residual as the last token's. It goes through ``edit_layers``' ``quant_keys`` slot, which asks
extra keys per request for the same residual.

``upper-noise``: during the targets stage only, every decoder layer above the edited window has
its update (output minus input) scaled elementwise by 1 + SIGMA * N(0, 1), fresh noise per pass,
so each neutral target must hold for a neighbourhood of the layers a fine-tune revives facts
through. Its targets are cached under their own keys.

Both print bench/quality.py's JSON; pass ``--keep-out OUT`` and run ``zu verify --model OUT
--forget probes.jsonl --baseline BASE --attack relearn`` for the relearning figures
(docs/results.md, "Where relearning brings facts back"). Neither is part of zu.
"""

from __future__ import annotations

import hashlib
import os
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def first_keys() -> None:
    """Patch ``update.edit_layers`` to solve for the subject's first-token keys as well."""
    import zu_cli.update as update
    from zu_cli.edit import Rows, lookup_index, outputs_at
    from zu_cli.text import encode, subject_positions

    seen = {}
    edit_layers = update.edit_layers

    def remember(model, tok, spec, requests, layers, weights, biases, z, sens, templates, *rest, **kw):
        seen.update(requests=requests, templates=templates)
        return edit_layers(model, tok, spec, requests, layers, weights, biases, z, sens, templates, *rest, **kw)

    def keys(model, tok, spec, rows, n, layer, quantised, done, biases, rounded):
        first = Rows()
        for i, req in enumerate(seen["requests"]):
            subject = req.subject if req.subject and lookup_index(tok, req.prompt, req.subject) > 0 else None
            for tpl in seen["templates"]:
                text = tpl.format(req.prompt)
                ids = encode(tok, text)
                at = min(subject_positions(tok, text, subject)) if subject else len(ids) - 1
                first.seqs.append(ids)
                first.lookup.append(at if at > 0 else lookup_index(tok, text, subject))  # never the sink
                first.owner.append(i)
                first.targets.append([])
        mod = spec.down_proj_module(layer)
        with update.applied(model, spec, done, biases):
            return outputs_at(model, tok, first, [mod], n, inputs=True)[mod]  # (n, f)

    update.edit_layers = remember
    update.quantised_below = lambda model, spec, top, formats: ["first-subject-token"]
    update.quant_keys = keys


def upper_noise(sigma: float) -> None:
    """Patch ``edit.edit_targets`` to run with the layers above the window perturbed."""
    import zu_cli.edit as edit
    from zu_cli import targets_cache
    from zu_cli.hooks import get_module

    gen = torch.Generator().manual_seed(0)
    request_keys, edit_targets = targets_cache.request_keys, edit.edit_targets

    def hook(mod, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = out[0] if isinstance(out, tuple) else out
        noise = torch.randn(h_out.shape, generator=gen).to(h_out.dtype)
        new = h_in + (h_out - h_in) * (1 + sigma * noise)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    def noisy(model, tok, spec, requests, layers, *rest, **kw):
        above = range(layers[-1] + 1, model.config.num_hidden_layers)
        handles = [get_module(model, spec.layer_module(l)).register_forward_hook(hook, with_kwargs=True)
                   for l in above]
        try:
            return edit_targets(model, tok, spec, requests, layers, *rest, **kw)
        finally:
            for h in handles:
                h.remove()

    targets_cache.request_keys = lambda *a: [hashlib.sha256(f"upper-noise{sigma}:{k}".encode()).hexdigest()[:40]
                                             for k in request_keys(*a)]
    edit.edit_targets = noisy


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("first-keys", "upper-noise"):
        sys.stderr.write(__doc__)
        return 2
    if sys.argv[1] == "first-keys":
        first_keys()
    else:
        upper_noise(float(os.environ.get("SIGMA", "0.2")))
    sys.argv = ["quality.py", *sys.argv[2:]]
    runpy.run_path(str(ROOT / "bench" / "quality.py"), run_name="__main__")  # exits with quality.py's code
    return 0


if __name__ == "__main__":
    sys.exit(main())
