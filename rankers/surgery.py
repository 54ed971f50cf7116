"""MTRec's gradient surgery, modified for one main task and its auxiliary tasks.

Over the parameters that the tasks share (the text encoder), with g_main the gradient of the
main (1 + K)-way loss and g_aux = lambda * (g_category + g_NER):

    if g_aux . g_main < 0:   g_aux <- g_aux - (g_aux . g_main / |g_main|^2) g_main
    g = g_main + g_aux

Only the auxiliary gradient is projected (onto the normal plane of the main one): the main
task is never bent towards an auxiliary one. The original, symmetric surgery (PCGrad, which
projects each task off every other) did worse in MTRec's ablation. lambda = 0.3, as published.

Gradients come as lists of per-parameter tensors (None where a task does not reach a
parameter): the dot products run over all of them at once, as if flattened into one vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LAMBDA = 0.3


@dataclass(frozen=True)
class SurgeryStep:
    """What one application did, for logging: the cosine of the raw gradients and whether
    the auxiliary gradient was projected."""

    cosine: float
    projected: bool


def project_conflicting(g_main: torch.Tensor, g_aux: torch.Tensor) -> torch.Tensor:
    """The flat auxiliary gradient (P,) with its component against g_main (P,) removed when
    they conflict (negative dot product); otherwise g_aux unchanged."""
    dot = torch.dot(g_aux.double(), g_main.double())
    norm2 = torch.dot(g_main.double(), g_main.double())
    if dot >= 0 or norm2 == 0:
        return g_aux
    return g_aux - (dot / norm2).to(g_aux.dtype) * g_main


def _dot(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """Sum over parameters of <a_i, b_i> in float64; None counts as zeros. Summed on the
    gradients' device, so a GPU step waits for the host once, not once per parameter."""
    parts = [torch.sum(x.double() * y.double()) for x, y in zip(a, b) if x is not None and y is not None]
    return float(torch.stack(parts).sum()) if parts else 0.0


def combine(
    g_main: Sequence[torch.Tensor | None], g_aux: Sequence[torch.Tensor | None], weight: float = LAMBDA
) -> tuple[list[torch.Tensor | None], SurgeryStep]:
    """Per-parameter gradients g_main + project(weight * g_aux), and what happened.

    `g_aux` is the raw sum of the auxiliary tasks' gradients; `weight` is lambda."""
    if len(g_main) != len(g_aux):
        raise ValueError(f"gradient lists differ in length: {len(g_main)} main vs {len(g_aux)} auxiliary")
    dot = _dot(g_main, g_aux) * weight
    main2 = _dot(g_main, g_main)
    aux2 = _dot(g_aux, g_aux) * weight * weight
    cosine = dot / (main2 ** 0.5 * aux2 ** 0.5) if main2 > 0 and aux2 > 0 else 0.0  # no underflowing product
    projected = dot < 0 and main2 > 0
    coef = dot / main2 if projected else 0.0
    out: list[torch.Tensor | None] = []
    for m, a in zip(g_main, g_aux):
        if a is None:
            out.append(m)
            continue
        aux = a * weight
        if m is None:
            out.append(aux)  # g_main is 0 here, so the projection changes nothing
            continue
        out.append(m + aux - coef * m if projected else m + aux)
    return out, SurgeryStep(cosine=cosine, projected=projected)
