"""Self-describing checkpoints: config + encoder (vocabularies) + separate tower state dicts.

Everything in the file is a tensor or plain data, so it loads with ``torch.load(weights_only=True)``:
a checkpoint cannot run code when it is opened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from towers.artifacts import atomic_open
from towers.features import FeatureEncoder, gather_rows
from towers.inference import UserEmbedder, UserTowerNumpy
from towers.model import ItemTower, TowerConfig, UserTower

FORMAT = "twotower-checkpoint/1"


class CheckpointError(ValueError):
    """The file is not a usable checkpoint (missing, truncated, wrong format)."""


@dataclass
class TwoTowerModel:
    config: TowerConfig
    encoder: FeatureEncoder
    user_tower: UserTower | None
    item_tower: ItemTower | None
    meta: dict[str, Any] = field(default_factory=dict)
    _user_np: UserTowerNumpy | None = field(default=None, init=False, repr=False, compare=False)
    # the user tower a NumPy twin was refused for (an attention encoder): not asked again per call
    _no_twin: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def create(cls, config: TowerConfig, encoder: FeatureEncoder, meta: dict[str, Any] | None = None) -> TwoTowerModel:
        m = encoder.meta()
        return cls(config, encoder, UserTower(config, m), ItemTower(config, m), dict(meta or {}))

    @property
    def dim(self) -> int:
        return self.config.dim

    def eval(self) -> TwoTowerModel:
        for t in (self.user_tower, self.item_tower):
            if t is not None:
                t.eval()
        return self

    def embed_items(self, items: pd.DataFrame, batch_size: int = 65536) -> np.ndarray:
        """(N, D) float32 vectors for catalogue rows (indexed by item id), in the frame's order."""
        return self._embed_item_batches(len(items), batch_size,
                                        lambda s, e: self.encoder.encode_items(items.iloc[s:e]))

    def embed_item_rows(self, table: Mapping[str, torch.Tensor], rows: np.ndarray,
                        batch_size: int = 65536) -> np.ndarray:
        """(len(rows), D) float32 vectors of item ``rows`` of an already encoded table
        (``FeatureEncoder.encode_item_table``): no side feature is encoded again."""

        def batch(s: int, e: int) -> dict[str, torch.Tensor]:
            part = torch.from_numpy(np.ascontiguousarray(rows[s:e], dtype=np.int64))
            return gather_rows(table, part.to(next(iter(table.values())).device))

        return self._embed_item_batches(len(rows), batch_size, batch)

    @torch.no_grad()
    def _embed_item_batches(self, n: int, batch_size: int,
                            batch: Callable[[int, int], Mapping[str, torch.Tensor]]) -> np.ndarray:
        """The item tower over ``batch(start, end)`` for every slice of ``n`` rows, in eval mode."""
        if self.item_tower is None:
            raise RuntimeError("this model was loaded without its item tower")
        self.item_tower.eval()
        dev = _device_of(self.item_tower)
        out = np.empty((n, self.dim), dtype=np.float32)
        for s in range(0, n, batch_size):
            vec = self.item_tower({k: v.to(dev) for k, v in batch(s, min(n, s + batch_size)).items()})
            out[s: s + len(vec)] = vec.float().cpu().numpy()
        return out

    @torch.inference_mode()
    def embed_users(self, user_ids: Sequence[Any], features: pd.DataFrame | Sequence[Mapping[str, Any] | None] | None,
                    histories: Sequence[Sequence[Any]] | None, batch_size: int = 8192) -> np.ndarray:
        """(B, D) float32 user vectors ((B, K, D) for a model with K > 1 interests); unknown ids use
        the out-of-vocabulary row."""
        if self.user_tower is None:
            raise RuntimeError("this model was loaded without its user tower")
        twin = self._numpy_user_tower()
        if twin is not None:  # the NumPy forward, as the service runs it
            return UserEmbedder(self.encoder, twin, self.dim).embed_users(user_ids, features, histories, batch_size)
        dev = _device_of(self.user_tower)
        on_cpu = dev.type == "cpu"
        if self.user_tower.training:  # Module.eval() walks every submodule: ~0.2 ms
            self.user_tower.eval()
        n = len(user_ids)
        k = self.config.interests
        out = np.empty((n, self.dim) if k == 1 else (n, k, self.dim), dtype=np.float32)
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            feats: Any = None
            if isinstance(features, pd.DataFrame):
                feats = features.iloc[s:e]
            elif features is not None:
                feats = features[s:e]
            batch = self.encoder.encode_users(user_ids[s:e], feats,
                                              histories[s:e] if histories is not None else None)
            if not on_cpu:
                batch = {k: v.to(dev) for k, v in batch.items()}
            out[s:e] = self.user_tower(batch).float().cpu().numpy()
        return out

    def user_embedder(self) -> UserEmbedder:
        """The user side as the service runs it (NumPy only; ``save`` writes the bundle's export).
        ValueError when the user tower has a layer the NumPy forward cannot mirror."""
        if self.user_tower is None:
            raise RuntimeError("this model was loaded without its user tower")
        twin = self._numpy_user_tower()
        if twin is None:
            raise ValueError("the user tower has no NumPy forward (a layer it cannot mirror, or not on the CPU)")
        return UserEmbedder(self.encoder, twin, self.dim)

    def _numpy_user_tower(self) -> UserTowerNumpy | None:
        """The user tower's NumPy forward (towers.inference), built once and rebuilt if the module's
        parameters moved; None off the CPU or when the tower has a layer it cannot mirror."""
        assert self.user_tower is not None
        twin = self._user_np
        if twin is not None and twin.matches(self.user_tower):
            return twin
        if self._no_twin is self.user_tower or _device_of(self.user_tower).type != "cpu":
            self._user_np = None
            return None
        try:
            self._user_np = UserTowerNumpy.from_module(self.user_tower)
        except ValueError:
            self._user_np, self._no_twin = None, self.user_tower
        return self._user_np


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def checkpoint_payload(model: TwoTowerModel, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    if model.user_tower is None or model.item_tower is None:
        raise ValueError("a checkpoint holds both towers")
    return {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "encoder": model.encoder.to_dict(),
        "user_tower": {k: v.detach().cpu() for k, v in model.user_tower.state_dict().items()},
        "item_tower": {k: v.detach().cpu() for k, v in model.item_tower.state_dict().items()},
        "meta": dict(meta if meta is not None else model.meta),
    }


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` whole or not at all (``towers.artifacts.atomic_open``): a crash never leaves
    half a file."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(path: str | Path, model: TwoTowerModel, meta: dict[str, Any] | None = None) -> None:
    atomic_torch_save(checkpoint_payload(model, meta), path)


def load_checkpoint(path: str | Path, parts: Sequence[str] = ("user", "item"),
                    map_location: str | torch.device = "cpu") -> TwoTowerModel:
    """Rebuild the model from the file alone. ``parts`` picks the towers to build (serving needs
    only "user")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, pickled code...
        raise CheckpointError(f"{path}: not a loadable checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    try:
        config = TowerConfig.from_dict(payload["config"])
        encoder = FeatureEncoder.from_dict(payload["encoder"])
        meta = encoder.meta()
        user = item = None
        if "user" in parts:
            user = UserTower(config, meta)
            user.load_state_dict(payload["user_tower"])
            user.eval()
        if "item" in parts:
            item = ItemTower(config, meta)
            item.load_state_dict(payload["item_tower"])
            item.eval()
    except (KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: checkpoint does not match its own config ({exc})") from exc
    return TwoTowerModel(config, encoder, user, item, dict(payload.get("meta", {})))
