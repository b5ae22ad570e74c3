"""The user tower's forward pass for serving, in NumPy: the same arithmetic as ``UserTower.forward``.

Why: a serving batch is a handful of users, and at that size torch's per-op dispatch is the cost,
not the arithmetic. Measured on the 2-core benchmark machine for 8 users: the module's forward
took ~0.3-0.45 ms, of which the padded mean ``embedding_bag`` alone ~80 us and ``F.normalize`` ~45
us; the gathers, means and normalisation below cost a few microseconds each, and the linear layers
are one small matrix product each. The serving process then needs no torch at all (the api image
carries NumPy, not torch): ``UserEmbedder`` loads the tower's weights from the export the reindex
job writes into every bundle (``user_tower.npz``), with the feature encoder beside them.

Two ways to build the forward:
- ``UserTowerNumpy.from_module(tower)``: views of a live module's CPU parameters (no copy), so an
  optimizer step or ``load_state_dict`` (both in place) is seen at once; ``matches`` tells whether
  the views still point at the module's storage (after ``.to(device)`` they would not). Used by
  ``TwoTowerModel.embed_users`` during training and evaluation.
- ``UserTowerNumpy.from_state(meta, arrays)``: from the export (``state()`` writes it).

BLAS threads: the matrix products run on NumPy's BLAS; the service keeps that to one thread (see
service.runtime), so its thread pool cannot spin against the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from towers.features import FeatureEncoder

if TYPE_CHECKING:
    from towers.model import UserTower

_EPS = 1e-12  # F.normalize's default
EXPORT_FORMAT = "twotower-user-tower/1"


def _bag(table: np.ndarray, idx: np.ndarray, mean: bool) -> np.ndarray:
    """EmbeddingBag over the rows of (B, M) ``idx`` with padding row 0 left out: (B, D). A row with
    nothing but padding pools to zeros, as torch's does. One gather and one weighted sum (~30 us
    for 8 x 50 ids; a segment-sum over only the non-padding ids took ~55 us in small NumPy calls)."""
    mask = idx != 0
    w = mask.astype(table.dtype)  # (B, M): 1 for an id, 0 for padding
    if mean:
        w /= np.maximum(mask.sum(axis=1, keepdims=True), 1)
    return np.einsum("bm,bmd->bd", w, table[idx])


def _ages(idx: np.ndarray) -> np.ndarray:
    """``towers.model.history_ages``: items after each one (0 = the most recent), 0 at padding."""
    return np.maximum((idx != 0).sum(axis=1, keepdims=True) - 1 - np.arange(idx.shape[1])[None, :], 0)


def _pool_history(kind: str, p: Mapping[str, np.ndarray], table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The history encoders of towers.model with a twin here -> (B, E). ``mean``: the padded mean;
    ``recency``: weights exp(-rate * age); ``attention``: softmax of a learned score over item +
    age embeddings ((B, K, E) with K > 1 interests: K scores, K softmaxes). A row of padding alone
    pools to zeros in each."""
    if kind == "mean":
        return _bag(table, idx, mean=True)
    valid = idx != 0
    ages = _ages(idx)
    if kind == "recency":
        rate = float(np.exp(np.asarray(p["log_rate"]).reshape(-1)[0]))  # 0-d view, or 1-d once exported
        w = np.exp(-rate * ages).astype(np.float32) * valid  # (B, L)
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
        return np.einsum("bl,ble->be", w, table[idx])
    e = table[idx]  # (B, L, E)
    age = p["age"][np.minimum(ages, len(p["age"]) - 1)]  # (B, L, E)
    h = np.tanh((e + age) @ p["proj_w"].T + p["proj_b"])  # (B, L, E)
    logits = np.where(valid[:, :, None], h @ p["score_w"].T, -1e9)  # (B, L, K): one softmax per interest
    a = np.exp(logits - logits.max(axis=1, keepdims=True)) * valid[:, :, None]
    a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-12)
    if a.shape[2] == 1:
        return np.einsum("bl,ble->be", a[:, :, 0].astype(np.float32), e)  # (B, E)
    return np.einsum("blk,ble->bke", a.astype(np.float32), e)  # (B, K, E): the user's interests


def _array(v: Any) -> np.ndarray:
    return v if isinstance(v, np.ndarray) else (v.numpy() if hasattr(v, "numpy") else np.asarray(v))


class UserTowerNumpy:
    """Callable like the module on an encoded batch (arrays or tensors) -> (B, D) float32 array."""

    def __init__(self, *, user: np.ndarray | None, hist: np.ndarray | None,
                 side: list[tuple[str, str, np.ndarray | None, bool]],
                 layers: list[tuple[str, np.ndarray | None, np.ndarray | None]],
                 hist_encoder: str = "mean", hist_params: Mapping[str, np.ndarray] | None = None) -> None:
        self.user, self.hist = user, hist  # (U, E), (I, E) id and history tables
        # how the history is pooled (towers.model's encoder) and that encoder's own weights
        self.hist_encoder, self.hist_params = hist_encoder, dict(hist_params or {})
        self.side = side  # (batch key, kind, table or None, mean pooling) per user feature
        self.layers = layers  # ("linear", W (out, in), b) or ("relu", None, None), in order
        self._tower: Any = None
        self._slots: list[tuple[Any, str]] = []
        self._ptrs: tuple[int, ...] = ()

    # ------------------------------------------------------------------ from a module (torch)
    @classmethod
    def from_module(cls, tower: UserTower) -> UserTowerNumpy:
        """Views of ``tower``'s CPU parameters; ValueError for a tower off the CPU or with a layer
        this forward has no twin for."""
        from torch import nn

        from towers.model import AttentionHistory, MeanHistory, RecencyHistory

        if next(tower.parameters()).device.type != "cpu":
            raise ValueError("the NumPy forward needs the tower on the CPU")

        def view(p: Any) -> np.ndarray:
            return p.detach().numpy()

        enc = tower.hist_encoder
        hist_params: dict[str, np.ndarray] = {}
        if enc is None or isinstance(enc, MeanHistory):
            hist_encoder = "mean"
        elif isinstance(enc, RecencyHistory):
            hist_encoder, hist_params = "recency", {"log_rate": view(enc.log_rate)}
        elif isinstance(enc, AttentionHistory):
            hist_encoder = "attention"
            hist_params = {"age": view(enc.age.weight), "proj_w": view(enc.proj.weight),
                           "proj_b": view(enc.proj.bias), "score_w": view(enc.score.weight)}
        else:  # the self-attention encoder: the service reads model.pt (torch) for it
            raise ValueError(f"no NumPy twin for history encoder {type(enc).__name__}")

        feats = tower.features
        mean = tower.cfg.multi_pooling == "mean"
        side: list[tuple[str, str, np.ndarray | None, bool]] = []
        for i, key in enumerate(feats.keys):
            kind = feats.kinds[key]
            table = view(feats.tables[str(i)].weight) if kind != "numeric" else None
            side.append((key, kind, table, mean))
        layers: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
        for m in tower.mlp:
            if isinstance(m, nn.Linear):
                layers.append(("linear", view(m.weight), view(m.bias)))
            elif isinstance(m, nn.ReLU):
                layers.append(("relu", None, None))
            elif isinstance(m, nn.Dropout):
                continue  # identity at inference
            else:
                raise ValueError(f"no NumPy twin for layer {type(m).__name__}")
        twin = cls(user=view(tower.user_emb.weight) if tower.user_emb is not None else None,
                   hist=view(tower.hist_emb.weight) if tower.hist_emb is not None else None,
                   side=side, layers=layers, hist_encoder=hist_encoder, hist_params=hist_params)
        # where each weight lives: (module, parameter name) -> storage address at build time
        twin._tower = tower
        twin._slots = [(mod, name) for mod in tower.modules() for name in mod._parameters]
        twin._ptrs = twin._pointers()
        return twin

    def _pointers(self) -> tuple[int, ...]:
        return tuple(-1 if (p := mod._parameters[name]) is None else p.data_ptr() for mod, name in self._slots)

    def matches(self, tower: UserTower) -> bool:
        """True while this twin still views ``tower``'s parameter storage: False after ``.to()`` or a
        parameter replaced by a new tensor, and always for a twin loaded from an export. (Checked
        per call, so it reads the recorded parameter slots directly: walking ``tower.parameters()``
        cost ~0.1 ms.)"""
        return tower is self._tower and self._pointers() == self._ptrs

    # ------------------------------------------------------------------ the export
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(layout, arrays): what ``from_state`` rebuilds this forward from."""
        arrays: dict[str, np.ndarray] = {}
        if self.user is not None:
            arrays["user"] = self.user
        if self.hist is not None:
            arrays["hist"] = self.hist
        for i, (_key, _kind, table, _mean) in enumerate(self.side):
            if table is not None:
                arrays[f"side.{i}"] = table
        for i, (_op, w, b) in enumerate(self.layers):
            if w is not None and b is not None:
                arrays[f"layer.{i}.w"], arrays[f"layer.{i}.b"] = w, b
        for name, a in self.hist_params.items():
            arrays[f"history.{name}"] = a
        layout = {"side": [[key, kind, mean] for key, kind, _t, mean in self.side],
                  "layers": [op for op, _w, _b in self.layers], "history": self.hist_encoder}
        return layout, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

    @classmethod
    def from_state(cls, layout: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> UserTowerNumpy:
        side = [(str(key), str(kind), arrays.get(f"side.{i}"), bool(mean))
                for i, (key, kind, mean) in enumerate(layout["side"])]
        for key, kind, table, _mean in side:
            if kind != "numeric" and table is None:
                raise ValueError(f"no table for user feature {key!r}")
        layers: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
        for i, op in enumerate(layout["layers"]):
            if op == "linear":
                layers.append(("linear", arrays[f"layer.{i}.w"], arrays[f"layer.{i}.b"]))
            elif op == "relu":
                layers.append(("relu", None, None))
            else:
                raise ValueError(f"unknown layer {op!r}")
        hist_encoder = str(layout.get("history", "mean"))  # exports from before the encoders: the mean
        if hist_encoder not in ("mean", "recency", "attention"):
            raise ValueError(f"unknown history encoder {hist_encoder!r}")
        hist_params = {k.removeprefix("history."): v for k, v in arrays.items() if k.startswith("history.")}
        need = {"mean": set(), "recency": {"log_rate"}, "attention": {"age", "proj_w", "proj_b", "score_w"}}
        if need[hist_encoder] - set(hist_params):
            raise ValueError(f"no {sorted(need[hist_encoder] - set(hist_params))} for the {hist_encoder} history")
        return cls(user=arrays.get("user"), hist=arrays.get("hist"), side=side, layers=layers,
                   hist_encoder=hist_encoder, hist_params=hist_params)

    @property
    def interests(self) -> int:
        """User vectors per user: the attention scorer's outputs (1 for every other encoder)."""
        w = self.hist_params.get("score_w") if self.hist is not None and self.hist_encoder == "attention" else None
        return 1 if w is None else int(np.asarray(w).shape[0])

    @property
    def out_dim(self) -> int:
        last = [w for op, w, _b in self.layers if op == "linear"]
        if not last or last[-1] is None:
            raise ValueError("the tower has no linear layer")
        return int(last[-1].shape[0])

    # ------------------------------------------------------------------ forward
    def __call__(self, batch: Mapping[str, Any]) -> np.ndarray:
        get = {k: _array(v) for k, v in batch.items()}
        parts: list[np.ndarray] = []
        if self.user is not None:
            parts.append(self.user[get["user_row"]])  # (B, E)
        if self.hist is not None:
            parts.append(_pool_history(self.hist_encoder, self.hist_params, self.hist, get["hist"]))  # (B, E)
        for key, kind, table, mean in self.side:
            x = get[key]
            if kind == "numeric":
                parts.append(x.astype(np.float32, copy=False)[:, None])  # (B, 1)
            elif kind == "multi":
                assert table is not None
                parts.append(_bag(table, x, mean))  # (B, F)
            else:
                assert table is not None
                parts.append(table[x])  # (B, F)
        if any(p.ndim == 3 for p in parts):  # K interests: every one sees the same id and features
            k = max(p.shape[1] for p in parts if p.ndim == 3)
            parts = [p if p.ndim == 3 else np.broadcast_to(p[:, None, :], (p.shape[0], k, p.shape[1]))
                     for p in parts]
        y: np.ndarray = np.concatenate(parts, axis=-1) if len(parts) > 1 else np.ascontiguousarray(parts[0])
        y = y.astype(np.float32, copy=False)
        for op, w, b in self.layers:
            if op == "linear":
                assert w is not None and b is not None
                y = y @ w.T + b  # (B, in) @ (in, out)
            else:
                np.maximum(y, 0.0, out=y)
        norm = np.sqrt(np.einsum("...j,...j->...", y, y))[..., None]
        return (y / np.maximum(norm, _EPS)).astype(np.float32, copy=False)  # (B, D), or (B, K, D)


class UserEmbedder:
    """What serving needs of a trained model: the feature encoder and the user tower's forward.

    ``embed_users`` is ``TwoTowerModel.embed_users`` without torch; ``save``/``load`` are the
    bundle's ``user_tower.npz``: the tower's arrays plus a JSON header (format, dimension, layout,
    encoder), read with ``allow_pickle=False`` so opening it cannot run code."""

    def __init__(self, encoder: FeatureEncoder, tower: UserTowerNumpy, dim: int) -> None:
        self.encoder, self.tower, self.dim = encoder, tower, int(dim)
        self.interests = tower.interests

    def embed_users(self, user_ids: Sequence[Any], features: Any, histories: Sequence[Sequence[Any]] | None,
                    batch_size: int = 8192) -> np.ndarray:
        """(B, D) float32 user vectors ((B, K, D) for a model with K > 1 interests); unknown ids
        use the out-of-vocabulary row."""
        n = len(user_ids)
        out = np.empty((n, self.dim) if self.interests == 1 else (n, self.interests, self.dim), dtype=np.float32)
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            feats: Any = None
            if hasattr(features, "iloc"):  # a DataFrame aligned with the ids
                feats = features.iloc[s:e]
            elif features is not None:
                feats = features[s:e]
            batch = self.encoder.encode_users_arrays(user_ids[s:e], feats,
                                                     histories[s:e] if histories is not None else None)
            out[s:e] = self.tower(batch)
        return out

    def save(self, path: str | Path) -> None:
        layout, arrays = self.tower.state()
        header = {"format": EXPORT_FORMAT, "dim": self.dim, "layout": layout, "encoder": self.encoder.to_dict()}
        meta = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez(f, __meta__=meta, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> UserEmbedder:
        """ValueError naming the file for anything that is not a complete export."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(bytes(z["__meta__"]).decode("utf-8"))
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
        except Exception as exc:  # not a zip, truncated, pickled arrays, no header...
            raise ValueError(f"{path}: not a loadable user tower export ({exc.__class__.__name__}: {exc})") from exc
        if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{path}: not a {EXPORT_FORMAT} file")
        try:
            tower = UserTowerNumpy.from_state(header["layout"], arrays)
            model = cls(FeatureEncoder.from_dict(header["encoder"]), tower, int(header["dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: user tower export is inconsistent ({exc})") from exc
        if tower.out_dim != model.dim:
            raise ValueError(f"{path}: the tower outputs dim {tower.out_dim}, its header says {model.dim}")
        return model
