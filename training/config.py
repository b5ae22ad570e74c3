"""The training job's configuration: one dataclass with every default (no heavy imports, so the
CLI can read the defaults for ``--help`` without loading torch or pandas)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

NEGATIVES = ("inbatch", "uniform", "popularity", "mixed", "hard", "none")
LOSS_NAMES = ("softmax", "bpr", "bce")
# Fields that only change how a run executes, never what it computes: on --resume they come from the
# new invocation, every other field from the interrupted run's config.json.
_RUNTIME_FIELDS = ("artifacts", "device", "quiet", "num_threads", "stop_after_epoch", "resume")


@dataclass
class TrainConfig:
    """Every knob of the training job, with defaults tuned on MovieLens-100k (see BENCHMARKS.md)."""

    # data
    data: str = "synthetic"                 # "synthetic" | "movielens:DIR" | "csv:DIR"
    data_options: dict[str, Any] = field(default_factory=dict)  # synthetic size options for load_data
    artifacts: str = "artifacts"
    # model
    model: str = "youtubednn"               # "youtubednn" | "dssm"
    dim: int = 64                           # output (retrieval) dimension
    emb_dim: int | None = None              # id/history embedding width; None = dim (needed for tying)
    feature_dim: int = 16
    hidden: tuple[int, ...] = (256,)
    dropout: float = 0.0
    temperature: float = 0.05
    history_len: int = 5                    # ML-100k: the last few items predict the next best (3-20 tried)
    use_user_id: bool = True
    use_history: bool = True
    use_user_features: bool = True
    use_item_features: bool = True
    tie_embeddings: bool = True             # the history table IS the item output table while training
    user_id_dropout: float = 0.1            # share of examples whose user id is replaced by the OOV row
    # negatives and loss
    negatives: str = "mixed"                # inbatch | uniform | popularity | mixed | hard | none
    loss: str = "softmax"                   # softmax | bpr | bce ("none" negatives -> positive-only)
    num_negatives: int = 256                # extra sampled items per batch (uniform/popularity/mixed/hard)
    hard_negatives: int = 256               # hard: negatives kept per row (64 -> 0.35, 256 -> 0.49 on ML-100k)
    popularity_alpha: float = 0.75
    logq_correction: bool = True
    # also mask candidates from the user's training history. Always on for "hard": the highest-scoring
    # non-positives are mostly the user's own past items, and pushing them down wrecks the model
    mask_history_hits: bool = False
    # optimisation
    epochs: int = 4                         # with the cosine schedule: the length of the decay
    batch_size: int = 512
    lr: float = 3e-3
    lr_schedule: str = "cosine"             # "constant" | "cosine" (decays to 0 at the last epoch)
    weight_decay: float = 0.0
    patience: int = 3                       # epochs without a better valid HR@K before stopping
    eval_k: int = 50
    seed: int = 0
    # execution
    device: str = "auto"                    # auto | cpu | cuda
    num_threads: int | None = None          # torch CPU threads; None = the idle cores (>= 1)
    quiet: bool = False
    resume: str | None = None               # a model version, or "latest": continue that run
    stop_after_epoch: int | None = None     # stop (as if interrupted) after this epoch; for resume tests

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.emb_dim is None:
            self.emb_dim = self.dim
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.model in ("youtubednn", "dssm"), f"model must be youtubednn or dssm, got {self.model!r}")
        need(self.negatives in NEGATIVES, f"negatives must be one of {', '.join(NEGATIVES)}, got {self.negatives!r}")
        need(self.loss in LOSS_NAMES, f"loss must be one of {', '.join(LOSS_NAMES)}, got {self.loss!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 2, f"batch size must be >= 2, got {self.batch_size}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}")
        need(self.lr_schedule in ("constant", "cosine"),
             f"lr schedule must be constant or cosine, got {self.lr_schedule!r}")
        need(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        need(self.dim >= 1 and (self.emb_dim or 0) >= 1, "dim and emb_dim must be >= 1")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(self.history_len >= 1, f"history length must be >= 1, got {self.history_len}")
        need(0.0 <= self.user_id_dropout < 1.0, f"user id dropout must be in [0, 1), got {self.user_id_dropout}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.num_negatives >= 1, f"num negatives must be >= 1, got {self.num_negatives}")
        need(self.hard_negatives >= 1, f"hard negatives must be >= 1, got {self.hard_negatives}")
        need(self.popularity_alpha >= 0, f"popularity alpha must be >= 0, got {self.popularity_alpha}")
        need(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        need(self.eval_k >= 1, f"eval k must be >= 1, got {self.eval_k}")
        need(self.num_threads is None or self.num_threads >= 1, "num threads must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def tower_config(self) -> Any:
        from towers.model import TowerConfig

        return TowerConfig(model=self.model, dim=self.dim, emb_dim=int(self.emb_dim or self.dim),
                           feature_dim=self.feature_dim, hidden=self.hidden, dropout=self.dropout,
                           temperature=self.temperature, use_user_id=self.use_user_id,
                           use_history=self.use_history, use_user_features=self.use_user_features,
                           use_item_features=self.use_item_features)


