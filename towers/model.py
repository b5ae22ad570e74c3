"""The tower modules: only nn.Modules live here (loss and sampling are in ``training/``).

UserTower and ItemTower are separate modules with separate state dicts so the service loads only
the user side. Both end in an L2 normalisation: scores are cosines, and the loss divides them by
``TowerConfig.temperature``.

The id tables (user ids, history items, item ids) are the only parameters that grow with the number
of users and items, so they are ``sparse=True`` embeddings: backward yields a row-sparse gradient
holding only the rows a batch looked up, and the training job updates just those rows (see
``training/optim.py``). Side-feature tables are small vocabularies and stay dense. ``sparse`` only
changes the gradient's layout, never a forward result, so inference ignores it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from towers import HISTORY_ENCODERS, MODELS, MULTI_POOLINGS


@dataclass
class TowerConfig:
    model: str = "youtubednn"          # "youtubednn" | "dssm"
    dim: int = 64                       # output (retrieval) dimension
    emb_dim: int = 64                   # id / history embedding width
    feature_dim: int = 16               # side-feature embedding width
    hidden: tuple[int, ...] = (256,)    # MLP hidden layers of each tower
    dropout: float = 0.0
    temperature: float = 0.05           # logits = cosine / temperature
    use_user_id: bool = True            # a learned per-user embedding (OOV row for new users)
    use_history: bool = True            # mean-pooled embeddings of the user's recent items
    use_user_features: bool = True
    use_item_features: bool = True      # YoutubeDNN: content features added to the softmax weights
    item_id_embedding: bool = True      # DSSM: the item id as an input of the item MLP
    multi_pooling: str = "mean"         # "mean" | "sum" for multi-valued features (EmbeddingBag)
    history_encoder: str = "mean"       # one of HISTORY_ENCODERS
    history_len: int = 50               # longest history the encoder reads (its position tables)
    recency_half_life: float = 8.0      # "recency": initial half-life of the weights, in items
    attention_heads: int = 2            # "transformer": heads per layer
    attention_layers: int = 1           # "transformer": layers
    interests: int = 1                  # user vectors per user ("attention" only): multi-interest if > 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.multi_pooling not in MULTI_POOLINGS:
            raise ValueError(f"multi_pooling must be one of {MULTI_POOLINGS}, got {self.multi_pooling!r}")
        if self.history_encoder not in HISTORY_ENCODERS:
            raise ValueError(f"history_encoder must be one of {HISTORY_ENCODERS}, got {self.history_encoder!r}")
        if self.history_len < 1 or self.recency_half_life <= 0:
            raise ValueError("history_len must be >= 1 and recency_half_life > 0")
        if self.history_encoder == "transformer" and self.emb_dim % self.attention_heads:
            raise ValueError(f"emb_dim {self.emb_dim} must be a multiple of attention_heads {self.attention_heads}")
        if self.interests < 1:
            raise ValueError(f"interests must be >= 1, got {self.interests}")
        if self.interests > 1 and (self.history_encoder != "attention" or not self.use_history):
            raise ValueError(f"interests = {self.interests} needs the attention history encoder "
                             f"(got history_encoder={self.history_encoder!r}, use_history={self.use_history})")
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TowerConfig:
        known = {f.name for f in fields(cls)}
        # checkpoints written before history encoders existed pooled by the mean
        return cls(**{"history_encoder": "mean", **{k: v for k, v in d.items() if k in known}})


class SideFeatures(nn.Module):
    """Embeds one side's features and concatenates them: categorical -> Embedding,
    multi-valued -> EmbeddingBag (padding row 0 excluded from the pooling), numeric -> as is."""

    def __init__(self, specs: list[tuple[str, str, int]], feature_dim: int, pooling: str) -> None:
        super().__init__()
        self.keys = [k for k, _, _ in specs]
        self.kinds = {k: kind for k, kind, _ in specs}
        # ModuleDict keys cannot contain "." and must be stable: index by position
        self.tables = nn.ModuleDict()
        self.out_dim = 0
        for i, (_key, kind, size) in enumerate(specs):
            if kind == "categorical":
                self.tables[str(i)] = nn.Embedding(size, feature_dim, padding_idx=0)
                self.out_dim += feature_dim
            elif kind == "multi":
                self.tables[str(i)] = nn.EmbeddingBag(size, feature_dim, mode=pooling, padding_idx=0)
                self.out_dim += feature_dim
            else:
                self.out_dim += 1
        for t in self.tables.values():
            weight = t.weight
            assert isinstance(weight, torch.Tensor)
            nn.init.normal_(weight, std=0.05)
            with torch.no_grad():
                weight[0].zero_()  # row 0 = missing value / padding: contributes nothing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        parts = []
        for i, key in enumerate(self.keys):
            x = batch[key]
            kind = self.kinds[key]
            if kind == "numeric":
                parts.append(x.float().unsqueeze(-1))  # (B, 1)
            else:
                parts.append(self.tables[str(i)](x))  # (B, feature_dim)
        return torch.cat(parts, dim=-1) if parts else None


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def masked_mean(emb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, D) embeddings over positions whose row is not padding -> (B, D).
    A user with an empty history gets a zero vector (the MLP still sees the other inputs)."""
    mask = (rows != 0).unsqueeze(-1).to(emb.dtype)  # (B, L, 1)
    total = (emb * mask).sum(dim=1)  # (B, D)
    count = mask.sum(dim=1).clamp_min(1.0)  # (B, 1)
    return total / count


def history_ages(rows: torch.Tensor) -> torch.Tensor:
    """(B, L) left-aligned item rows (oldest first, 0-padded right) -> (B, L) long: how many items
    came after each one (0 = the most recent), and 0 at padding positions (masked by callers)."""
    n = (rows != 0).sum(dim=1, keepdim=True)  # (B, 1)
    pos = torch.arange(rows.shape[1], device=rows.device).unsqueeze(0)  # (1, L)
    return (n - 1 - pos).clamp_min(0)


class MeanHistory(nn.Module):
    """The YoutubeDNN baseline: the mean of the history's item embeddings, order-free."""

    def forward(self, table: torch.Tensor, rows: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        # padding rows excluded from sum and count, as one fused op (~6x faster than gather, mask,
        # sum on CPU); an empty history pools to zeros
        return F.embedding_bag(rows, table, mode="mean", padding_idx=0, sparse=sparse)  # (B, E)


class RecencyHistory(nn.Module):
    """A weighted mean with weights ``exp(-rate * age)``: the latest items count most. The rate is
    learned, starting from ``half_life`` items (the weight halves every ``half_life`` older items)."""

    def __init__(self, half_life: float) -> None:
        super().__init__()
        self.log_rate = nn.Parameter(torch.tensor(math.log(math.log(2.0) / half_life)))

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, L) normalised weights; 0 at padding, all 0 for an empty history."""
        w = torch.exp(-self.log_rate.exp() * history_ages(rows).to(self.log_rate.dtype))
        w = w * (rows != 0).to(w.dtype)
        return w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, table: torch.Tensor, rows: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        return F.embedding_bag(rows, table, mode="sum", per_sample_weights=self.weights(rows),
                               sparse=sparse)  # (B, E)


class AttentionHistory(nn.Module):
    """Attention pooling: a learned scorer over each item embedding plus an embedding of its age
    (so it can learn recency as well as which items say most); softmax over the real items.

    With ``interests`` K > 1 the scorer has K outputs, one softmax over the history each: K pooled
    vectors (B, K, E), the user's interests (a multi-interest extractor in the manner of ComiRec-SA).
    A user who likes two unrelated things gets a vector near each, where one vector would sit
    between them, or on the side of the one with more history."""

    def __init__(self, emb_dim: int, max_len: int, interests: int = 1) -> None:
        super().__init__()
        self.interests = int(interests)
        self.age = nn.Embedding(max_len, emb_dim)
        nn.init.normal_(self.age.weight, std=0.05)
        self.proj = nn.Linear(emb_dim, emb_dim)
        self.score = nn.Linear(emb_dim, self.interests, bias=False)

    def forward(self, table: torch.Tensor, rows: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        # the table is read once per DISTINCT item of the batch, and so is proj(e + age) = W e + (W age
        # + b), then gathered per slot: a batch's B x L history slots hold far fewer distinct items
        # (ML-100k: 25,600 slots, at most 1,682 items); that matmul was a step's largest cost there
        uniq, inv = torch.unique(rows, return_inverse=True)
        items = F.embedding(uniq, table, sparse=sparse)  # (U, E)
        e = F.embedding(inv, items)  # (B, L, E)
        ages = history_ages(rows).clamp_max(self.age.num_embeddings - 1)
        # the scorer is score(tanh(proj(e + age))), computed as 2 * score(sigmoid(2 proj(e + age))): tanh(x) =
        # 2 sigmoid(2x) - 1, and the - score(1) it leaves out is one constant per interest, which the softmax
        # over the history cancels. torch's CPU tanh costs ~5x its sigmoid (a microbenchmark while writing
        # this: 4.9 vs 0.9 ms at 512 x 50 x 64, 1 thread). The doubling is applied to the (U, E) and
        # (max_len, E) tables before the (B, L, E) gathers; F.embedding's backward (an index_add) beats
        # indexing's (an accumulating index_put). The A/B: benchmarks/interests.py --loss-only
        per_item = F.linear(items, self.proj.weight) * 2.0  # (U, E)
        per_age = self.proj(self.age.weight) * 2.0  # (max_len, E)
        h = torch.sigmoid(F.embedding(inv, per_item) + F.embedding(ages, per_age))  # (B, L, E)
        logits = F.linear(h, self.score.weight * 2.0)  # (B, L, K)
        valid = (rows != 0).unsqueeze(-1)  # (B, L, 1)
        a = torch.softmax(logits.masked_fill(~valid, -1e9), dim=1) * valid.to(e.dtype)  # (B, L, K); 0 if empty
        if self.interests > 1:
            return torch.einsum("blk,ble->bke", a, e)  # (B, K, E)
        if rows.shape[1] <= 16:
            # short windows: a broadcast product and a sum beat einsum's batched 1 x L matmuls
            # (fwd + bwd at 1024 x 6 x 64: 1.4 vs 3.6 ms; at 512 x 50 x 64 einsum is as fast or faster)
            return (a * e).sum(dim=1)  # (B, E)
        return torch.einsum("bl,ble->be", a.squeeze(-1), e)  # (B, E)


class TransformerHistory(nn.Module):
    """A small self-attention encoder (SASRec-like): item + age embeddings, pre-norm transformer
    layers over the real items (padding masked), the output at the most recent item."""

    def __init__(self, emb_dim: int, max_len: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.age = nn.Embedding(max_len, emb_dim)
        nn.init.normal_(self.age.weight, std=0.05)
        layer = nn.TransformerEncoderLayer(emb_dim, heads, dim_feedforward=2 * emb_dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(emb_dim)

    def forward(self, table: torch.Tensor, rows: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        valid = rows != 0  # (B, L)
        empty = ~valid.any(dim=1)  # (B,)
        ages = history_ages(rows).clamp_max(self.age.num_embeddings - 1)
        x = F.embedding(rows, table, sparse=sparse) + self.age(ages)  # (B, L, E)
        # an all-padding row would make every attention weight NaN: let it see its first slot, then
        # zero its output below
        pad = ~valid
        pad[:, 0] &= ~empty
        h = self.norm(self.layers(x, src_key_padding_mask=pad))  # (B, L, E)
        last = (valid.sum(dim=1) - 1).clamp_min(0)  # (B,) position of the most recent item
        out = h[torch.arange(len(rows), device=rows.device), last]  # (B, E)
        return out.masked_fill(empty.unsqueeze(-1), 0.0)


def history_encoder(cfg: TowerConfig) -> nn.Module:
    if cfg.history_encoder == "recency":
        return RecencyHistory(cfg.recency_half_life)
    if cfg.history_encoder == "attention":
        return AttentionHistory(cfg.emb_dim, cfg.history_len, cfg.interests)
    if cfg.history_encoder == "transformer":
        return TransformerHistory(cfg.emb_dim, cfg.history_len, cfg.attention_heads, cfg.attention_layers,
                                  cfg.dropout)
    return MeanHistory()


class UserTower(nn.Module):
    """User id embedding + pooled history (``history_encoder``) + user side features -> MLP -> unit vector.

    YoutubeDNN and DSSM share this shape; they differ in the defaults (DSSM has no history unless
    asked) and, mostly, on the item side.
    """

    def __init__(self, cfg: TowerConfig, meta: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        in_dim = 0
        self.user_emb: nn.Embedding | None = None
        self.hist_emb: nn.Embedding | None = None
        self.hist_encoder: nn.Module | None = None
        if cfg.use_user_id:
            self.user_emb = nn.Embedding(meta["n_user_rows"], cfg.emb_dim, padding_idx=0, sparse=True)
            nn.init.normal_(self.user_emb.weight, std=0.05)
            in_dim += cfg.emb_dim
        if cfg.use_history:
            self.hist_emb = nn.Embedding(meta["n_item_rows"], cfg.emb_dim, padding_idx=0, sparse=True)
            nn.init.normal_(self.hist_emb.weight, std=0.05)
            self.hist_encoder = history_encoder(cfg)
            in_dim += cfg.emb_dim
        self.features = SideFeatures(meta["user"] if cfg.use_user_features else [], cfg.feature_dim,
                                     cfg.multi_pooling)
        in_dim += self.features.out_dim
        if in_dim == 0:
            raise ValueError("the user tower has no inputs: enable user ids, history or features")
        self.mlp = mlp(in_dim, cfg.hidden, cfg.dim, cfg.dropout)
        with torch.no_grad():
            for emb in (self.user_emb, self.hist_emb):
                if emb is not None:
                    emb.weight[0].zero_()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.user_emb is not None:
            parts.append(self.user_emb(batch["user_row"]))  # (B, E)
        if self.hist_emb is not None:
            assert self.hist_encoder is not None
            # the table's ``sparse`` flag decides the gradient's layout (row-sparse for the training
            # job's table optimizer), never a result
            parts.append(self.hist_encoder(self.hist_emb.weight, batch["hist"], self.hist_emb.sparse))  # (B, E)
        side = self.features(batch)
        if side is not None:
            parts.append(side)
        k = self.cfg.interests
        if k > 1:  # the pooled history is (B, K, E): every interest sees the same id and features
            parts = [p if p.dim() == 3 else p.unsqueeze(1).expand(-1, k, -1) for p in parts]
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)  # (B, D), or (B, K, D)


class ItemTower(nn.Module):
    """YoutubeDNN: the item vector is a softmax weight (an id embedding of width ``dim``), plus,
    optionally, a projection of content features so an item never seen in training (row 0) still
    gets a vector. DSSM: an MLP over the id embedding and content features."""

    def __init__(self, cfg: TowerConfig, meta: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.features = SideFeatures(meta["item"] if cfg.use_item_features else [], cfg.feature_dim,
                                     cfg.multi_pooling)
        self.id_emb: nn.Embedding | None = None
        self.content: nn.Sequential | None = None
        self.mlp: nn.Sequential | None = None
        if cfg.model == "youtubednn":
            self.id_emb = nn.Embedding(meta["n_item_rows"], cfg.dim, padding_idx=0, sparse=True)
            nn.init.normal_(self.id_emb.weight, std=0.05)
            if self.features.out_dim:
                self.content = mlp(self.features.out_dim, cfg.hidden, cfg.dim, cfg.dropout)
        else:
            in_dim = self.features.out_dim
            if cfg.item_id_embedding:
                self.id_emb = nn.Embedding(meta["n_item_rows"], cfg.emb_dim, padding_idx=0, sparse=True)
                nn.init.normal_(self.id_emb.weight, std=0.05)
                in_dim += cfg.emb_dim
            if in_dim == 0:
                raise ValueError("the DSSM item tower has no inputs: enable item ids or features")
            self.mlp = mlp(in_dim, cfg.hidden, cfg.dim, cfg.dropout)
        if self.id_emb is not None:
            with torch.no_grad():
                self.id_emb.weight[0].zero_()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        side = self.features(batch)
        if self.mlp is None:  # YoutubeDNN
            assert self.id_emb is not None
            vec = self.id_emb(batch["item_row"])  # (N, D)
            if self.content is not None and side is not None:
                vec = vec + self.content(side)
        else:
            parts = []
            if self.id_emb is not None:
                parts.append(self.id_emb(batch["item_row"]))
            if side is not None:
                parts.append(side)
            vec = self.mlp(torch.cat(parts, dim=-1))
        # eps keeps a cold item with no features (all-zero input) at a finite, zero vector
        return F.normalize(vec, dim=-1, eps=1e-8)  # (N, D)
