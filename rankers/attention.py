"""The two attentions of NRMS / PLM-NR, with padding masked in both.

- `AdditiveAttention`: a_i = q^T tanh(V h_i + v); alpha = softmax over the real positions;
  r = sum_i alpha_i h_i. It pools a sequence (a title's tokens, a user's clicks) to one vector.
- `MaskedSelfAttention`: multi-head self-attention over a sequence whose padded positions
  are neither attended to (key padding mask) nor passed on (their outputs are zeroed).

- `Dropout`: nn.Dropout, with its keep mask drawn from 15-bit integers on the CPU.

Masks are True at real positions. A row without any real position (an empty history, a
missing image stored with an empty token mask) is handled explicitly: the softmax over no
positions is undefined (NaN in PyTorch), so such rows get all-zero weights and outputs,
and the caller decides what an empty row means (the user encoder substitutes a learned
"no history" vector).

Speed on the CPU (the rankers train on 2-core machines): drawing random numbers is what a
dropout costs there (torch's CPU generator gives about one float per 7 ns, 15x the multiply
it feeds), so `Dropout` takes four 15-bit draws out of each 64-bit one (p is then rounded
to a multiple of 1/32768); and `MaskedSelfAttention` calls torch's attention kernel itself
with its nn.MultiheadAttention's weights (the same parameters and state dict), except
when training on the CPU with dropout, where that kernel would take its generic path (a
"safe" softmax that scans every row for all -inf, and a float dropout): there it computes
softmax(q k^T / sqrt(d) + padding) with `Dropout` directly.
Letters: B batch, S sequence positions (L tokens or H clicks), D width, A additive hidden,
N heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_BITS = 15  # per draw in `keep_mask`: four from each 64-bit integer (whose top bit is 0)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape`, each entry True with probability 1 - p (p rounded to a
    multiple of 2^-15), from torch's default generator (seeded by torch.manual_seed)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    draws = words.view(torch.int16)[:n] & ((1 << _BITS) - 1)  # (n,) uniform in [0, 2^15)
    return (draws >= round(p * (1 << _BITS))).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training), with `keep_mask` on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    scale = keep_mask(x.shape, p, x.device).to(x.dtype) * (1.0 / (1.0 - p))  # no gradient flows into it
    return x * scale


class Dropout(nn.Dropout):
    """nn.Dropout (same arguments, no state) whose CPU masks come from `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


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

    def forward(self, h: torch.Tensor, mask: torch.Tensor, padding_is_zero: bool = False) -> torch.Tensor:
        """`padding_is_zero`: the caller guarantees h is 0 at padded positions (as
        MaskedSelfAttention's output is), which saves zeroing them here."""
        alpha = self.weights(h, mask).to(h.dtype)  # (B, S)
        if not padding_is_zero:
            # A padded position holding inf or NaN would still poison 0 * h in the sum.
            h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        return torch.bmm(alpha.unsqueeze(1), h).squeeze(1)  # (B, D)


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention (B, S, D) with mask (B, S) -> (B, S, D); padded outputs are 0.

    Every row attends only within itself (batch_first, no cross-row mixing), so the users
    of one batch never see each other's clicks. The weights live in an nn.MultiheadAttention
    (`attn`), whose computation this reproduces (module docstring).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width {dim} is not divisible by {heads} heads; choose heads dividing the width")
        self.heads = heads
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = h.shape
        n, w = self.heads, d // self.heads
        empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1)
        # An empty row would attend over no keys (NaN); let it attend over its (finite) padding
        # instead and discard the result below: real rows are untouched by this.
        attend = mask | empty  # (B, S) True = attended to
        qkv = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias)  # (B, S, 3D)
        p = self.attn.dropout if self.training else 0.0
        if p > 0.0 and h.device.type == "cpu":
            q, k, v = qkv.view(b, s, 3, n, w).permute(2, 0, 3, 1, 4).reshape(3, b * n, s, w).unbind(0)  # (BN, S, D/N)
            padding = torch.zeros(b, 1, 1, s, dtype=q.dtype).masked_fill_(~attend[:, None, None, :], float("-inf"))
            padding = padding.expand(b, n, 1, s).reshape(b * n, 1, s)  # (BN, 1, S)
            scores = torch.baddbmm(padding, q, k.transpose(1, 2), alpha=w ** -0.5)  # (BN, S, S)
            weights = dropout(torch.softmax(scores, dim=-1), p, True)
            out = torch.bmm(weights, v).view(b, n, s, w)  # (B, N, S, D/N)
        else:
            q, k, v = qkv.view(b, s, 3, n, w).permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, S, D/N) each
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :], dropout_p=p)
        out = F.linear(out.transpose(1, 2).reshape(b, s, d), self.attn.out_proj.weight, self.attn.out_proj.bias)
        # Outputs at padded query positions depend on the padding's values; zero them so that
        # nothing downstream can see what the padding held.
        return out.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, S, D)
