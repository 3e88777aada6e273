"""Forward hooks as context managers (after ROME's nethook): capture, edit, stop early; always removed."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the traced module has run."""


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called ``name``.

    Raises:
        LookupError: no such module (an ArchSpec that does not fit the model).
    """
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise LookupError(f"model has no module {name!r}") from exc


def contiguous_head(model: torch.nn.Module) -> None:
    """Make the output embedding's input contiguous on every call, for the model's lifetime.

    Under ``logits_to_keep`` the head gets a strided slice ``hidden[:, -k:]``; torch.matmul does not
    fold a strided 3-D input into one matrix product but expands the weight into a batched one,
    reading the whole vocabulary matrix once per row (measured, 70 rows of SmolLM2's head on
    CPU: 1.3 s instead of 0.11 s, forward and backward). Zu's sampling, probes, tracing and
    target search all project a few positions of many rows. Unlike the tracing hooks this one
    changes no value, so it stays installed (``checkpoint.load_model``).

    Args:
        model: a causal LM; one without an output embedding is left as it is.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return

    def pre(_mod, args, kwargs):
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:]), kwargs
        return None

    head.register_forward_pre_hook(pre, with_kwargs=True)


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


class Trace(contextlib.AbstractContextManager):
    """Trace one module during the forward passes inside the ``with`` block.

    Args:
        model: the model.
        name: module name, e.g. ``model.layers.3.mlp.down_proj``.
        retain_input: keep the module's first positional input in ``.input``.
        retain_output: keep its output (first element of a tuple) in ``.output``.
        edit_output: ``f(output, name, input) -> output`` applied to the module's output tensor
            (``input`` is the module's first positional input).
        stop: raise StopForward after this module ran (caught when the block exits).
        detach: detach retained tensors (no graph kept).
    """

    def __init__(self, model: torch.nn.Module, name: str, retain_input: bool = False, retain_output: bool = True,
                 edit_output: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor] | None = None,
                 stop: bool = False, detach: bool = True):
        self.name = name
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.plain_output = True  # False once the module returned a tuple
        module = get_module(model, name)

        def hook(mod, args, out):
            if retain_input:
                inp = args[0] if args else None
                self.input = inp.detach() if detach and inp is not None else inp
            self.plain_output = isinstance(out, torch.Tensor)
            if edit_output is not None:
                inp = args[0] if args else None
                if isinstance(out, tuple):
                    out = (edit_output(out[0], name, inp),) + tuple(out[1:])
                else:
                    out = edit_output(out, name, inp)
            if retain_output:
                o = _first(out)
                self.output = o.detach() if detach else o
            if stop:
                raise StopForward()
            return out

        self._handle = module.register_forward_hook(hook)

    def close(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is StopForward


class TraceDict(dict, contextlib.AbstractContextManager):
    """Trace several modules at once: ``td[name]`` is that module's Trace.

    Args:
        model: the model.
        names: module names.
        stop: stop the forward pass after the last of ``names`` (in the order given) ran.
        Other arguments as for Trace, applied to every module.
    """

    def __init__(self, model: torch.nn.Module, names: Iterable[str], retain_input: bool = False,
                 retain_output: bool = True,
                 edit_output: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor] | None = None,
                 stop: bool = False, detach: bool = True):
        super().__init__()
        names = list(names)
        try:
            for i, n in enumerate(names):
                self[n] = Trace(model, n, retain_input, retain_output, edit_output,
                                stop=stop and i == len(names) - 1, detach=detach)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove every hook."""
        for t in self.values():
            t.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is StopForward


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer: the first returns recorded hidden states, the rest pass through."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden


@contextlib.contextmanager
def replay_below(model: torch.nn.Module, layers_path: str, start: int, hidden_in: torch.Tensor):
    """Skip decoder layers ``[0, start)`` by replaying ``hidden_in``, the recorded input of layer ``start``.

    For repeated forward passes that only change things at or above ``start`` (optimising a
    delta), the lower layers need not run again. Valid only for models whose decoder layers
    return a plain tensor; the modules are restored on exit.

    Args:
        model: the model.
        layers_path: module path of the decoder layers' ModuleList.
        start: first layer that still runs.
        hidden_in: (B, S, d) input of layer ``start`` for the batch that will be fed.
    """
    stack = get_module(model, layers_path)
    saved = [stack[i] for i in range(start)]
    try:
        for i in range(start):
            stack[i] = _Replay(hidden_in if i == 0 else None)
        yield
    finally:
        for i, mod in enumerate(saved):
            stack[i] = mod


def layers_return_tensors(model: torch.nn.Module, layers_path: str, device: torch.device) -> bool:
    """Whether the decoder layers return a plain tensor (the condition of ``replay_below``), from
    one two-token pass stopped after layer 0."""
    with Trace(model, f"{layers_path}.0", stop=True) as t, torch.no_grad():
        model(input_ids=torch.tensor([[0, 1]], device=device))
    return t.plain_output


class LayerReplay:
    """Replays, pass after pass, what an earlier pass over the same row chunks recorded.

    ``update.edit_layers`` edits layers in increasing order and recomputes keys after each edit;
    an edit of layer l changes nothing below it, so the input of layer l recorded by the pass
    before that edit is still exact in the pass after it. ``at(layer)`` before each pass: that pass
    replays the input recorded by the previous one and records ``layer``'s input for the next.
    Inactive (every pass runs all layers) when the decoder layers return tuples.

    Args:
        model: the model.
        layers_path: module path of the decoder layers' ModuleList.
        active: False to run every pass in full (tests compare both).
    """

    def __init__(self, model: torch.nn.Module, layers_path: str, active: bool):
        self.model, self.path, self.active = model, layers_path, active
        self.start, self.inputs = 0, []  # replayed: layers below ``start``, per chunk the input of ``start``
        self.layer, self.recorded = None, []  # recorded by the current pass

    def at(self, layer: int) -> "LayerReplay":
        """Start a pass that records the input of ``layer`` (at or above the replayed one)."""
        if self.layer is not None:
            self.start, self.inputs = self.layer, self.recorded
        self.layer, self.recorded = layer, []
        return self

    @contextlib.contextmanager
    def chunk(self, j: int):
        """Context for chunk ``j`` of the pass: layers below ``start`` replayed, ``layer``'s input recorded."""
        if not self.active:
            yield
            return
        stack = get_module(self.model, self.path)

        def pre(_mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.recorded.append(x.detach())

        handle = stack[self.layer].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            replay = replay_below(self.model, self.path, self.start, self.inputs[j]) if self.start > 0 \
                else contextlib.nullcontext()
            with replay:
                yield
        finally:
            handle.remove()
