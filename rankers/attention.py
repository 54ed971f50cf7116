"""The two attentions of NRMS / PLM-NR, with padding masked in both.

- `AdditiveAttention`: a_i = q^T tanh(V h_i + v); alpha = softmax over the real positions;
  r = sum_i alpha_i h_i. It pools a sequence (a title's tokens, a user's clicks) to one vector.
- `MaskedSelfAttention`: multi-head self-attention over a sequence whose padded positions
  are neither attended to (key padding mask) nor passed on (their outputs are zeroed).

Masks are True at real positions. A row without any real position (an empty history, a
missing image stored with an empty token mask) is handled explicitly: the softmax over no
positions is undefined (NaN in PyTorch), so such rows get all-zero weights and outputs,
and the caller decides what an empty row means (the user encoder substitutes a learned
"no history" vector).
Letters: B batch, S sequence positions (L tokens or H clicks), D width, A additive hidden.
"""

from __future__ import annotations

import torch
from torch import nn


class AdditiveAttention(nn.Module):
    """(B, S, D) with mask (B, S) -> (B, D); an all-padding row pools to zeros."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)  # V, v
        self.query = nn.Linear(hidden, 1, bias=False)  # q

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention weights alpha: (B, S), summing to 1 over real positions, 0 elsewhere."""
        logits = self.query(torch.tanh(self.proj(h))).squeeze(-1).float()  # (B, S)
        empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1)
        # Padded positions get -inf so they take no weight; an empty row would be softmax of
        # all -inf (NaN), so its logits are left finite and its weights zeroed afterwards.
        logits = logits.masked_fill(~mask & ~empty, float("-inf"))
        alpha = torch.softmax(logits, dim=-1)  # (B, S)
        return alpha * mask

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        alpha = self.weights(h, mask).to(h.dtype)  # (B, S)
        # A padded position holding inf or NaN would still poison 0 * h in the sum.
        h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        return torch.einsum("bs,bsd->bd", alpha, h)  # (B, D)


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention (B, S, D) with mask (B, S) -> (B, S, D); padded outputs are 0.

    Every row attends only within itself (batch_first, no cross-row mixing), so the users
    of one batch never see each other's clicks.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width {dim} is not divisible by {heads} heads; choose heads dividing the width")
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1)
        # An empty row would attend over no keys (NaN); let it attend over its (finite) padding
        # instead and discard the result below: real rows are untouched by this.
        ignore = ~mask & ~empty  # (B, S) True = not attended to
        out, _ = self.attn(h, h, h, key_padding_mask=ignore, need_weights=False)  # (B, S, D)
        # Outputs at padded query positions depend on the padding's values; zero them so that
        # nothing downstream can see what the padding held.
        return out.masked_fill(~mask.unsqueeze(-1), 0.0)
