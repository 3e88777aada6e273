"""How much the targets stage holds at once: the optimisation's precision and its request batches.

The delta optimisation (design §2.3) back-propagates through every decoder layer above the
lowest optimised one, so the activations it keeps grow with the tokens in a batch. Requests are
independent there (each delta depends only on its own rows, and Adam does not see the loss's
scale), so splitting them into batches changes the memory and not the result.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import torch

# Bytes kept for the backward pass per token, per decoder layer, per byte of activation dtype,
# in units of (hidden + d_ff): measured on SmolLM2-135M under bfloat16 autocast (8.8 MB more peak
# RSS per extra row of ~22 tokens through 10 layers, i.e. ~40 KB per token-layer, d + d_ff = 2112).
KEPT_PER_TOKEN_LAYER = 10


def optim_dtype(device: torch.device, dtype: str) -> str:
    """``dtype`` with ``auto`` resolved: bfloat16 where the device has fast bfloat16 kernels.

    Args:
        device: the model's input device.
        dtype: ``float32``, ``bfloat16`` or ``auto``: bfloat16 on a CPU that computes it natively
            (``cpu_bf16_native``) and on accelerators with autocast, which about halves the time
            of the targets stage (the deltas themselves stay float32).

    Returns:
        ``float32`` or ``bfloat16``.
    """
    if dtype != "auto":
        return dtype
    if device.type == "cpu":
        fast = cpu_bf16_native()
    else:
        fast = torch.amp.is_autocast_available(device.type)
    return "bfloat16" if fast else "float32"


def cpu_bf16_native() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX) as well as oneDNN kernels.

    oneDNN also reports bfloat16 support on AVX-512 CPUs without them, where it emulates it: a
    512x576 by 576x1536 matmul took 74 ms in bfloat16 against 15.8 ms in float32 on such a Xeon
    (issue 27), so ``auto`` would make the targets stage about 5x slower there.
    """
    cpu = torch.cpu
    native = any(bool(getattr(cpu, name, lambda: False)()) for name in
                 ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def optim_autocast(device: torch.device, dtype: str, model: torch.nn.Module | None = None):
    """The autocast context for the delta optimisation's forward passes (``optim_dtype`` resolves ``dtype``).

    Args:
        device: the model's input device.
        dtype: ``optim_dtype`` setting.
        model: when given, the low-precision weight copies autocast makes are kept for the
            backward pass by reference to their parameter (``casts_by_reference``).

    Returns:
        A context manager.
    """
    if optim_dtype(device, dtype) == "float32":
        return contextlib.nullcontext()
    cast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return cast if model is None else _Both(cast, casts_by_reference(model, torch.bfloat16))


class _Both:
    """Two re-enterable context managers entered together (once per optimisation step)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __enter__(self):
        self.first.__enter__()
        self.second.__enter__()

    def __exit__(self, *exc):
        self.second.__exit__(*exc)
        return self.first.__exit__(*exc)


class _WeightRef:
    """Stands in, among the tensors saved for backward, for a cast copy of a parameter."""

    __slots__ = ("param", "transposed")

    def __init__(self, param: torch.Tensor, transposed: bool):
        self.param, self.transposed = param, transposed


def casts_by_reference(model: torch.nn.Module, dtype: torch.dtype):
    """Saved-tensor hooks that keep autocast's weight casts as references to the parameters.

    Why: under autocast every linear layer multiplies by a ``dtype`` copy of its weight, and the
    backward pass needs that copy to reach the input's gradient, so autograd keeps one copy of
    every weight above the optimised layers until the backward pass: on SmolLM2-135M ~200 MiB,
    ~40 % of the fp32 checkpoint. Keeping the parameter instead and casting it again in the
    backward pass costs one cast per weight and gives bit-identical gradients (a cast is
    deterministic). Parameters must not change between forward and backward (they do not: the
    optimisation moves only the deltas).

    Args:
        model: the model whose 2-D parameters are recognised.
        dtype: the autocast dtype.

    Returns:
        A ``torch.autograd.graph.saved_tensors_hooks`` context manager.
    """
    def fingerprint(shape: torch.Size, first: torch.Tensor, last: torch.Tensor) -> tuple:
        # A cast is exact, so the shape and a few entries at both ends name the weight.
        return tuple(shape), tuple(first.float().tolist()), tuple(last.float().tolist())

    table: dict[tuple, torch.Tensor | None] = {}
    for p in model.parameters():
        # Offloaded weights (meta placeholders) are cast from their onloaded copy: not recognised.
        if p.dim() == 2 and p.is_floating_point() and p.dtype != dtype and p.device.type != "meta":
            w = p.detach()
            key = fingerprint(w.shape, w[0, :8].to(dtype), w[-1, -8:].to(dtype))
            table[key] = None if key in table and table[key] is not p else p  # ambiguous: never replaced

    def pack(t: torch.Tensor):
        if t.dtype == dtype and t.dim() == 2 and t.numel() and not t.requires_grad:
            for transposed, w in ((False, t), (True, t.T)):  # linear layers save W or W^T
                p = table.get(fingerprint(w.shape, w[0, :8], w[-1, -8:]))
                if p is not None and p.device == t.device:
                    return _WeightRef(p, transposed)
        # Detached: a tensor kept as is would hold its own grad_fn when it is the op's output, a
        # reference cycle autograd cannot free if the graph is never run backward (a final step).
        return t.detach()

    def unpack(x):
        if isinstance(x, _WeightRef):
            w = x.param.detach().to(dtype)
            return w.T if x.transposed else w
        return x

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def model_bytes(model) -> int:
    """Bytes of the model's parameters in their loaded (compute) dtype; tied weights counted once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bytes_per_token(model, down_proj: str, layers_through: int, act_dtype: str) -> int:
    """Estimated bytes the backward pass keeps per token of a batch.

    Args:
        model: the loaded model.
        down_proj: module name of one down-projection (its weight gives d x d_ff).
        layers_through: decoder layers the optimisation back-propagates through.
        act_dtype: ``float32`` or ``bfloat16``, the activations' precision.

    Returns:
        Bytes per token.
    """
    hidden = model.get_input_embeddings().weight.shape[-1]
    width = model.get_submodule(down_proj).weight.numel() // hidden  # d_ff, whichever orientation
    size = 2 if act_dtype == "bfloat16" else 4
    return KEPT_PER_TOKEN_LAYER * (hidden + width) * size * layers_through


def plan_batches(rows_per_request: list[tuple[int, int]], per_token: int, budget: int, fixed: int = 0) -> list[slice]:
    """Split requests, in order, into batches whose padded tokens fit ``budget`` bytes.

    Args:
        rows_per_request: per request, (number of rows, longest row in tokens).
        per_token: bytes kept per token (``bytes_per_token``).
        budget: bytes a batch may keep.
        fixed: a batch size to use instead of the budget (0: use the budget).

    Returns:
        Consecutive slices covering every request; each holds at least one request, so a request
        larger than the budget still runs, alone.
    """
    n = len(rows_per_request)
    if fixed > 0:
        return [slice(b, min(n, b + fixed)) for b in range(0, n, fixed)]
    out, start, rows, longest = [], 0, 0, 0
    for i, (r, length) in enumerate(rows_per_request):
        if i > start and (rows + r) * max(longest, length) * per_token > budget:  # padded to its longest row
            out.append(slice(start, i))
            start, rows, longest = i, 0, 0
        rows, longest = rows + r, max(longest, length)
    if n:
        out.append(slice(start, n))
    return out


def trim_heap() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    Why: batches of different shapes leave glibc's heap fragmented, and the process keeps the
    pages. On SmolLM2 the targets stage of 30 requests, one per batch, grew resident memory by
    184 MiB without a trim after each batch and by 89 MiB with one, and at 50 requests that growth
    is what pushed the peak past twice the checkpoint.
    """
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # absent from musl
        libc.malloc_trim(0)
