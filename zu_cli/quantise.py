"""GGUF round trips of a model's linear weights, with the ``gguf`` library's quantisers.

Used twice: ``zu verify --attack quant`` probes a model whose weights went through a format, and
the edit (``quant_keys``) takes forget keys on the model as a quantised copy of it would compute
them. The weights below an edited layer are not changed by the edit, so their round trip through
a GGUF format is exactly what a user who quantises the edited checkpoint gets there.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .errors import UsageError

# Formats the gguf library can quantise (it has no quantiser for the K-quants).
GGUF_FORMATS = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")


def check_format(fmt: str, option: str = "--quant-formats") -> int:
    """The GGUF block size of ``fmt``, after checking the gguf library can quantise it.

    Raises:
        UsageError: an unknown format or one without a quantiser (exit 2).
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    try:
        qtype = GGMLQuantizationType[fmt]
        block = GGML_QUANT_SIZES[qtype][0]
        quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except (KeyError, NotImplementedError) as exc:
        raise UsageError(f"{option} {fmt}: the gguf library cannot quantise it "
                         f"(it does {', '.join(GGUF_FORMATS)})") from exc
    return block


def roundtrip(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` (out, in) quantised to ``fmt`` and back, in its own dtype and device.

    GGUF blocks run along the input dimension (the last one).
    """
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[fmt]
    w = weight.detach().float().cpu().numpy()
    back = quants.dequantize(quants.quantize(w, qtype), qtype)
    return torch.from_numpy(np.ascontiguousarray(back)).to(device=weight.device, dtype=weight.dtype)


def _input_last(module) -> bool | None:
    """Whether ``module``'s weight has its input dimension last (a Linear), first (GPT-2's Conv1D),
    or None for a module that is not a linear layer."""
    if isinstance(module, torch.nn.Linear):
        return True
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return False  # transformers.pytorch_utils.Conv1D: weight (in, out), output = x @ W + b
    return None


def quantisable(model, fmt: str, where: Callable[[str], bool] = lambda name: True) -> list[tuple[str, torch.nn.Module]]:
    """The model's linear layers a GGUF writer would quantise to ``fmt``, filtered by module name.

    Rows shorter than a block are left out, as GGUF writers keep such tensors at higher precision.
    """
    block = check_format(fmt)
    out = []
    for name, m in model.named_modules():
        last = _input_last(m)
        if last is not None and m.weight.shape[-1 if last else 0] % block == 0 and where(name):
            out.append((name, m))
    return out


class Quantised:
    """Quantised copies of some linear weights, computed once and swapped in on demand.

    Args:
        model: the model (weights materialised, not offloaded).
        fmt: a GGUF format.
        where: which modules, by name (default: every linear).
    """

    def __init__(self, model, fmt: str, where: Callable[[str], bool] = lambda name: True):
        self.fmt = fmt
        self.modules = [m for _, m in quantisable(model, fmt, where)]
        if any(m.weight.device.type == "meta" for m in self.modules):
            raise UsageError(f"a {fmt} round trip needs every weight it quantises in memory (some are offloaded)",
                             hint="load the model without --offload-dir (or with a larger --max-memory)")
        # GGUF blocks run along each weight's input dimension (the first of a Conv1D's).
        self.weights = [roundtrip(m.weight.data, fmt) if _input_last(m) else roundtrip(m.weight.data.T, fmt).T
                        for m in self.modules]

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Run the model with the quantised weights; the originals are back on exit."""
        saved = [m.weight.data for m in self.modules]
        try:
            for m, q in zip(self.modules, self.weights):
                m.weight.data = q
            yield
        finally:
            for m, w in zip(self.modules, saved):
                m.weight.data = w
