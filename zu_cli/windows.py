"""Which layers a window may hold (calibration's candidates, the default, ``--multi``'s): functions of
the model's depth and of where causal tracing finds its facts, never of one model's name."""

from __future__ import annotations

import math

WIDTH = 3
RELATIVE_ENDS = (0.33, 0.45, 0.6)  # where candidate windows end, as fractions of the depth
MULTI_EXTRA = 2  # --multi's window without tracing: the closed form's, this many layers lower
MULTI_WIDTH = 5  # --multi's window from the traced layers


def last_end(n_layers: int) -> int:
    """The deepest layer a window may end at: 30 % of the layers stay above it (the neutral target is
    written at the subject, and later layers must carry it to the position that predicts the answer)."""
    return max(0, n_layers - math.ceil(0.3 * n_layers) - 1)


def window_ending(end: int, n_layers: int, width: int = WIDTH, first: int = 0) -> list[int]:
    """``width`` layers ending at ``end`` (moved down to ``last_end``), fewer in a very shallow model;
    a window reaching below ``first`` (``ArchSpec.first_window_layer``) moves up past it whole."""
    end = min(end, last_end(n_layers))
    win = list(range(max(0, end - width + 1), end + 1))
    shift = max(0, first - win[0])
    return [layer + shift for layer in win if layer + shift < n_layers]


def default_window(n_layers: int, width: int = WIDTH, first: int = 0) -> list[int]:
    """The window without calibration (``--no-calibrate``, or a model that knows too few probe
    facts): ``width`` layers ending at a third of the depth."""
    return window_ending(max(width - 1, round(RELATIVE_ENDS[0] * n_layers)), n_layers, width, first)


def multi_window(window: list[int], first: int = 0, traced: list[int] | None = None,
                 n_layers: int | None = None) -> list[int]:
    """``--multi``'s window.

    Args:
        window: the closed form's window.
        first: the lowest layer a window may hold (``ArchSpec.first_window_layer``).
        traced: the window causal tracing found, or None (none found, or no tracing).
        n_layers: the model's depth (needed with ``traced``).

    Returns:
        With ``traced``: ``MULTI_WIDTH`` layers from its first layer, where the model recalls the
        facts (measured there: more forgotten, more neighbours kept, fewer facts back after
        quantisation or a fine-tune; docs/results.md, "--multi at the traced layers"). Without:
        ``window`` extended ``MULTI_EXTRA`` layers down, none below ``first``.
    """
    if traced and n_layers:
        return window_ending(traced[0] + MULTI_WIDTH - 1, n_layers, MULTI_WIDTH, first)
    return list(range(max(first, window[0] - MULTI_EXTRA), window[-1] + 1))


def candidate_windows(n_layers: int, traced: list[int], width: int = WIDTH, first: int = 0) -> list[list[int]]:
    """The windows calibration tries: one ending at each of ``RELATIVE_ENDS`` of the depth and the
    traced one (when tracing found an effect)."""
    ends = [max(width - 1, round(f * n_layers)) for f in RELATIVE_ENDS] + ([traced[-1]] if traced else [])
    wins = []
    for e in ends:
        w = window_ending(e, n_layers, width, first)
        if w not in wins:
            wins.append(w)
    return wins
