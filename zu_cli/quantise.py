"""Round trips of a model's linear weights through quantised formats, with the maintained quantisers:
the ``gguf`` library's for GGUF files, ``bitsandbytes``' own for what transformers loads with
``BitsAndBytesConfig`` (``load_in_8bit``: LLM.int8 weights; ``load_in_4bit``: NF4 or FP4, its default).

Used twice: ``zu verify --attack quant`` probes a model whose weights went through a format, and
the edit (``quant_keys``) takes forget keys on the model as a quantised copy of it would compute
them. The weights below an edited layer are not changed by the edit, so their round trip through
a format is exactly what a user who quantises the edited checkpoint gets there.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .errors import UsageError

# Formats the gguf library can quantise (it has no quantiser for the K-quants).
GGUF_FORMATS = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
# bitsandbytes as transformers applies it: int8 rows (LLM.int8, from float16), 4-bit blocks of 64
# without double quantisation (BitsAndBytesConfig's defaults; its default 4-bit type is fp4).
BNB_FORMATS = ("bnb-int8", "bnb-nf4", "bnb-fp4")
FORMATS = GGUF_FORMATS + BNB_FORMATS
BNB_BLOCK = 64


def bnb_available() -> bool:
    """Whether bitsandbytes can be imported (it is an optional dependency on some platforms)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def check_format(fmt: str, option: str = "--quant-formats") -> int:
    """How many input columns a weight's rows must be a multiple of for ``fmt`` (a GGUF format's
    block size; 1 for bitsandbytes, which blocks the flattened weight), after checking a
    quantiser for it is installed.

    Raises:
        UsageError: an unknown format, or one whose library cannot quantise it or is missing (exit 2).
    """
    if fmt in BNB_FORMATS:
        if not bnb_available():
            raise UsageError(f"{option} {fmt}: needs bitsandbytes, which is not installed",
                             hint="pip install bitsandbytes (or leave the bnb-* formats out)")
        return 1
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    try:
        qtype = GGMLQuantizationType[fmt]
        block = GGML_QUANT_SIZES[qtype][0]
        quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except (KeyError, NotImplementedError) as exc:
        raise UsageError(f"{option} {fmt}: not a format zu can quantise "
                         f"(it does {', '.join(FORMATS)}; the gguf library has no K-quant quantiser)") from exc
    return block


def roundtrip(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` (out, in) quantised to ``fmt`` and back, in its own dtype and device.

    GGUF blocks run along the input dimension (the last one); bitsandbytes quantises int8 per
    output row and 4-bit in blocks of the flattened (row-major) weight, as its Linear layers do.
    """
    if fmt in BNB_FORMATS:
        return _bnb_roundtrip(weight, fmt)
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[fmt]
    w = weight.detach().float().cpu().numpy()
    back = quants.dequantize(quants.quantize(w, qtype), qtype)
    return torch.from_numpy(np.ascontiguousarray(back)).to(device=weight.device, dtype=weight.dtype)


def _bnb_roundtrip(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """bitsandbytes' quantise and dequantise of ``weight`` (out, in), as ``Int8Params`` and
    ``Params4bit`` store it when transformers loads a model with ``BitsAndBytesConfig``."""
    import bitsandbytes.functional as bnbf

    w = weight.detach().contiguous()
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # bitsandbytes takes at most 32 bits
        w = w.float()
    if fmt == "bnb-int8":  # Int8Params casts to float16, then one absmax scale per output row
        q, scale, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
        back = bnbf.int8_vectorwise_dequant(q, scale)
    else:
        q, state = bnbf.quantize_4bit(w, blocksize=BNB_BLOCK, compress_statistics=False, quant_type=fmt[4:])
        back = bnbf.dequantize_4bit(q, state)
    return back.to(device=weight.device, dtype=weight.dtype)


def kept_unquantised(model, fmt: str) -> set[str]:
    """Module names a loader leaves unquantised for ``fmt``: for bitsandbytes, what transformers
    skips (the output embedding and tied weights, ``get_keys_to_not_convert``); for GGUF, none."""
    if fmt not in BNB_FORMATS:
        return set()
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # transformers 4.x
        from transformers.integrations import get_keys_to_not_convert
    return set(get_keys_to_not_convert(model))


def _input_last(module) -> bool | None:
    """Whether ``module``'s weight has its input dimension last (a Linear), first (GPT-2's Conv1D),
    or None for a module that is not a linear layer."""
    if isinstance(module, torch.nn.Linear):
        return True
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return False  # transformers.pytorch_utils.Conv1D: weight (in, out), output = x @ W + b
    return None


def quantisable(model, fmt: str, where: Callable[[str], bool] = lambda name: True) -> list[tuple[str, torch.nn.Module]]:
    """The model's linear layers a GGUF writer or transformers' bitsandbytes loader would quantise
    to ``fmt``, filtered by module name.

    Rows shorter than a block are left out, as GGUF writers keep such tensors at higher precision;
    so is what transformers keeps unquantised (``kept_unquantised``).
    """
    block = check_format(fmt)
    skip = kept_unquantised(model, fmt)
    out = []
    for name, m in model.named_modules():
        last = _input_last(m)
        if (last is not None and m.weight.shape[-1 if last else 0] % block == 0 and where(name)
                and not any(name == k or name.endswith("." + k) for k in skip)):
            out.append((name, m))
    return out


class Quantised:
    """Quantised copies of some linear weights, computed once and swapped in on demand.

    Args:
        model: the model (weights materialised, not offloaded).
        fmt: a format of ``FORMATS``.
        where: which modules, by name (default: every linear).
    """

    def __init__(self, model, fmt: str, where: Callable[[str], bool] = lambda name: True):
        self.fmt = fmt
        self.modules = [m for _, m in quantisable(model, fmt, where)]
        if any(m.weight.device.type == "meta" for m in self.modules):
            raise UsageError(f"a {fmt} round trip needs every weight it quantises in memory (some are offloaded)",
                             hint="load the model without --offload-dir (or with a larger --max-memory)")
        # Blocks run along each weight's input dimension (the first of a Conv1D's).
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


def format_list(formats: str) -> list[str]:
    """The formats a comma-separated setting names (``quant_keys``, ``z_quant``); empty: none."""
    return [f.strip() for f in formats.split(",") if f.strip()]


def quantised_copies(model, formats: str) -> list[Quantised]:
    """A ``Quantised`` copy of every weight a format quantises, one per format of ``formats``.

    Raises:
        UsageError: a format with no weight of this model to quantise (exit 2).
    """
    out = [Quantised(model, f) for f in format_list(formats)]
    for q in out:
        if not q.modules:
            raise UsageError(f"z_quant: no weight of this model can be quantised to {q.fmt} (rows must be whole blocks)")
    return out
