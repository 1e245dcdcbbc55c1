"""Pick the card's output columns out of a model's output tensors (private)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from columnhub.errors import ModelError
from columnhub.inference.registry import ModelCard

__all__ = ["select_outputs"]


def select_outputs(
    card: ModelCard, tensors: Mapping[str, np.ndarray], *, n_rows: int
) -> dict[str, np.ndarray]:
    """One 1-D array per card output, taken from the model's output tensors.

    A card output reads tensor ``output.tensor`` (default: its name); when the
    model has a single output tensor, every card output reads that one. A 2-D
    tensor gives column ``output.index`` (or its only column).

    Raises:
        ModelError: a tensor the card names is missing, or has the wrong shape.
    """
    names: Sequence[str] = list(tensors)
    out: dict[str, np.ndarray] = {}
    for o in card.outputs:
        tensor_name = o.tensor or o.name
        if tensor_name in tensors:
            t = tensors[tensor_name]
        elif len(names) == 1:
            t = tensors[names[0]]
        else:
            msg = (
                f"model {card.name!r} version {card.version!r} has no output tensor "
                f"{tensor_name!r}; it has {', '.join(names)}; set 'tensor:' of output {o.name!r}"
            )
            raise ModelError(msg)
        t = np.asarray(t)
        if t.ndim == 2 and o.index is not None:
            if o.index >= t.shape[1]:
                msg = (
                    f"output {o.name!r} of model {card.name!r} reads column {o.index} of a tensor "
                    f"with {t.shape[1]} columns; fix 'index:' in the card"
                )
                raise ModelError(msg)
            t = t[:, o.index]
        elif t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        elif t.ndim != 1:
            msg = (
                f"output {o.name!r} of model {card.name!r} is a tensor of shape {t.shape}; "
                "set 'index:' in the card to pick one column"
            )
            raise ModelError(msg)
        if len(t) != n_rows:
            msg = f"model {card.name!r} returned {len(t)} rows for {n_rows} input rows"
            raise ModelError(msg)
        out[o.name] = t
    return out
