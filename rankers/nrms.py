"""NRMS / PLM-NR over stored (frozen) features: news encoders, fusion, user encoder, dot product.

The model is a composition of small named parts and returns scores; the loss lives in the
training step (rankers.train).

- news encoder, one per role: the stored features standardised per dimension (statistics
  of the training news, fixed; see `Standardize`), then over token vectors Linear(D_in -> d),
  masked multi-head self-attention, additive attention (the NRMS news encoder, whose word
  embeddings are here a frozen extractor's last hidden states, as in PLM-NR); over pooled
  vectors (a store without tokens, or `use_tokens=False`), Linear(D_in -> d) and a GELU.
- fusion (rankers.fusion): {role: (U, d)} -> (U, d).
- user encoder: masked multi-head self-attention over the vectors of the user's clicks,
  then additive attention. Each row of a batch is one user and attends only over its own
  history (the thesis this project re-examines let users attend across the batch). An empty
  history gives a learned "no history" vector.
- score: u . h_c.

`NRMS.forward` takes the features of U distinct news and (B', H) / (B, C) indices into those
U rows, so a batch encodes every distinct news once (training dedups with torch.unique;
the naive path passes one row per slot, and both give the same scores), and optionally
which of the B' histories each of the B rows has, so it encodes each distinct user once.
Letters: B impressions (users), B' distinct histories of a batch, H history, C candidates
(1 + K in training), U distinct news of a batch, L tokens, D_in a store's width, d the model width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from rankers.attention import AdditiveAttention, Dropout, MaskedSelfAttention
from rankers.base import ROLES, check_fields
from rankers.fusion import roles_of
from rankers.fusion_module import create_fusion


@dataclass(frozen=True)
class NRMSConfig:
    """Hyperparameters of the model and its training.

    Published NRMS+BERT on MIND-small: AdamW lr 1e-4, batch 128, K = 4, history 50, 16 heads,
    additive hidden 200, 3 epochs, fine-tuning the PLM. Here the extractor is frozen and only
    the small ranker on top trains, so the learning rate is 10x larger (1e-3, usual for NRMS
    over fixed embeddings; MIND-small gives ~2,300 steps an epoch). On the synthetic small
    world (80 steps an epoch, pooled features) 1e-3 and 3e-3 ended within 0.005 dev AUC of
    each other; the tiny world's 8 steps an epoch want 3e-3. Early stopping on the
    validation split (patience 2, at most 10 epochs) decides when to stop. The width d = 128
    with 8 heads of 16 (NRMS: 16 heads of 16 = 256) halves the ranker's cost; d = 64 and 128
    gave similar dev AUC on the synthetic small world, larger d was not tried.
    """

    dim: int = 128  # d: news and user vector width
    heads: int = 8  # must divide dim
    additive_hidden: int = 200  # A, as published
    dropout: float = 0.2
    history: int = 50  # the most recent clicks kept
    negatives: int = 4  # K
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 10
    patience: int = 2  # epochs without a better validation AUC before stopping
    seed: int = 0
    # False (default): pooled vectors; None: token vectors where a store has them; True: tokens,
    # an error where a store has none. Over frozen features pooled is the default: a token
    # step costs about 40x a pooled one (benchmarks/rank_train.py), and on the synthetic small
    # world tokens did not help (dev AUC, tiny extractors: text 0.539 tokens / 0.548 pooled,
    # hadamard 0.610 / 0.630). Fine-tuning (rankers.finetune) always attends over tokens.
    use_tokens: bool | None = False
    pooled_roles: tuple[str, ...] = ()  # roles encoded from pooled vectors even when tokens exist

    def __post_init__(self) -> None:
        checks = {
            "dim": self.dim > 0, "heads": self.heads > 0 and self.dim % self.heads == 0,
            "additive_hidden": self.additive_hidden > 0, "dropout": 0.0 <= self.dropout < 1.0,
            "history": self.history > 0, "negatives": self.negatives > 0, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "batch_size": self.batch_size > 0,
            "epochs": self.epochs > 0, "patience": self.patience > 0,
            "pooled_roles": all(r in ROLES for r in self.pooled_roles),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid NRMSConfig {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}"
                             f" (heads must divide dim {self.dim}; dropout in [0, 1); roles among {ROLES})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> NRMSConfig:
        check_fields(cls, values)
        values = dict(values)
        if "pooled_roles" in values:
            values["pooled_roles"] = tuple(values["pooled_roles"])  # JSON gives a list
        return cls(**values)


@dataclass
class RoleInput:
    """One role's features for U news: pooled vectors, or token vectors with their mask."""

    vectors: torch.Tensor | None = None  # (U, D_in)
    tokens: torch.Tensor | None = None  # (U, L, D_in)
    mask: torch.Tensor | None = None  # (U, L) bool, True = real token


class Standardize(nn.Module):
    """x -> (x - mean) / std per input dimension, with statistics fixed before training.

    Frozen extractors give anisotropic vectors: the tiny BERT's [CLS] varies across news by
    about 1% of its mean in every dimension, so without this the first linear layer sees a
    near-constant input and the ranker does not learn (loss stuck at ln(1 + K)). The
    statistics are buffers: they are saved with the model and never trained.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))  # (D_in,)
        self.register_buffer("inv_std", torch.ones(dim))  # (D_in,)

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        # Dimensions that do not vary in the fitting rows are zeroed rather than blown up.
        self.inv_std.copy_(torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.zeros_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class TokenNewsEncoder(nn.Module):
    """Token vectors (U, L, D_in) with mask (U, L) -> news vectors (U, d)."""

    def __init__(self, in_dim: int, config: NRMSConfig):
        super().__init__()
        self.in_dim = in_dim
        self.norm = Standardize(in_dim)
        self.proj = nn.Linear(in_dim, config.dim)
        self.drop = Dropout(config.dropout)
        self.self_attn = MaskedSelfAttention(config.dim, config.heads, config.dropout)
        self.pool = AdditiveAttention(config.dim, config.additive_hidden)

    def forward(self, x: RoleInput) -> torch.Tensor:
        h = self.drop(self.proj(self.norm(x.tokens)))  # (U, L, d)
        h = self.drop(self.self_attn(h, x.mask))  # (U, L, d)
        return self.pool(h, x.mask)  # (U, d)


class PooledNewsEncoder(nn.Module):
    """Pooled vectors (U, D_in) -> news vectors (U, d)."""

    def __init__(self, in_dim: int, config: NRMSConfig):
        super().__init__()
        self.in_dim = in_dim
        self.norm = Standardize(in_dim)
        self.net = nn.Sequential(nn.Linear(in_dim, config.dim), nn.GELU(), Dropout(config.dropout))

    def forward(self, x: RoleInput) -> torch.Tensor:
        return self.net(self.norm(x.vectors))  # (U, d)


class UserEncoder(nn.Module):
    """Clicked news vectors (B, H, d) with mask (B, H) -> user vectors (B, d)."""

    def __init__(self, config: NRMSConfig):
        super().__init__()
        self.self_attn = MaskedSelfAttention(config.dim, config.heads, config.dropout)
        self.drop = Dropout(config.dropout)
        self.pool = AdditiveAttention(config.dim, config.additive_hidden)
        self.no_history = nn.Parameter(torch.randn(config.dim) * 0.02)  # (d,)

    def forward(self, clicks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.self_attn(clicks, mask))  # (B, H, d), 0 at padding
        u = self.pool(h, mask, padding_is_zero=True)  # (B, d); zeros for an empty history
        has_history = mask.any(dim=-1, keepdim=True)  # (B, 1)
        return torch.where(has_history, u, self.no_history.to(u.dtype))  # (B, d)


class NRMS(nn.Module):
    """News encoders per role -> fusion -> user encoder -> dot-product scores.

    `widths[role]` is the stored feature width D_in of each role the fusion needs and
    `tokens[role]` whether that role is encoded from token vectors.
    """

    def __init__(self, config: NRMSConfig, fusion: str, widths: dict[str, int], tokens: dict[str, bool]):
        super().__init__()
        self.config = config
        self.roles = roles_of(fusion)
        missing = [r for r in self.roles if r not in widths or r not in tokens]
        if missing:
            raise ValueError(f"fusion {fusion!r} needs feature roles {self.roles}; no width for {missing}")
        self.tokens = {r: bool(tokens[r]) for r in self.roles}
        self.news = nn.ModuleDict({
            r: (TokenNewsEncoder if self.tokens[r] else PooledNewsEncoder)(int(widths[r]), config) for r in self.roles
        })
        self.fusion = create_fusion(fusion, config.dim)
        self.user = UserEncoder(config)

    def encode_news(self, inputs: dict[str, RoleInput]) -> torch.Tensor:
        """{role: features of U news} -> (U, d)."""
        return self.fusion({r: self.news[r](inputs[r]) for r in self.roles})  # (U, d)

    def encode_user(self, clicks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, d), (B, H) -> (B, d)."""
        return self.user(clicks, mask)

    @staticmethod
    def score(users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, d), (B, C, d) -> (B, C): u . h_c."""
        # In float32 even under bf16 autocast: bf16's 8-bit mantissa would tie close candidates.
        return torch.einsum("bd,bcd->bc", users.float(), candidates.float())

    def forward(
        self, inputs: dict[str, RoleInput], history: torch.Tensor, history_mask: torch.Tensor, candidates: torch.Tensor,
        users: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Features of U news, history (B', H) and candidates (B, C) as indices into them,
        history_mask (B', H) -> scores (B, C). `users` (B,) gives the history row of each
        candidate row (None: row b has history b, B' = B): a history shared by several rows
        (the clicks of one impression) is encoded once."""
        news = self.encode_news(inputs)  # (U, d)
        user = self.encode_user(news[history], history_mask)  # (B', H, d) -> (B', d)
        if users is not None:
            user = user[users]  # (B, d)
        return self.score(user, news[candidates])  # (B, C)
