"""The training job's configuration: one pydantic model with every default and every constraint
(no heavy imports, so the CLI can read the defaults for ``--help`` without loading torch or pandas).

A new knob is one line here, its constraint being its type (``towers.validation``); the CLI flag
is one ``add_flag`` line in ``training/cli.py``, which takes the default, parser and choices from
this line. ``tower_config()`` passes every field whose name is a ``TowerConfig`` field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, model_validator

from towers import ModelName, MultiPooling
from towers.validation import (
    Fraction,
    JobConfig,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)

Negatives = Literal["inbatch", "uniform", "popularity", "mixed", "hard", "none"]
NEGATIVES: tuple[str, ...] = get_args(Negatives)  # the one list of sampler names
LossName = Literal["softmax", "bpr", "bce"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)  # the losses a user picks ("none" negatives -> "positive")
# Fields that only change how a run executes, never what it computes: on --resume they come from the
# new invocation, every other field from the interrupted run's config.json.
_RUNTIME_FIELDS = ("artifacts", "device", "quiet", "num_threads", "stop_after_epoch", "resume")


class TrainConfig(JobConfig):
    """Every knob of the training job, with defaults tuned on MovieLens-100k (see BENCHMARKS.md)."""

    # data
    data: str = "synthetic"                 # "synthetic" | "movielens:DIR" | "csv:DIR"
    data_options: dict[str, Any] = Field(default_factory=dict)  # synthetic size options for load_data
    artifacts: str = "artifacts"
    # model
    model: ModelName = "youtubednn"
    dim: PositiveInt = 64                   # output (retrieval) dimension
    emb_dim: PositiveInt | None = None      # id/history embedding width; None = dim (needed for tying)
    feature_dim: PositiveInt = 16
    hidden: tuple[PositiveInt, ...] = (256,)
    dropout: Fraction = 0.0
    temperature: PositiveFloat = 0.05
    history_len: PositiveInt = 5            # ML-100k: the last few items predict the next best (3-20 tried)
    use_user_id: bool = True
    use_history: bool = True
    use_user_features: bool = True
    use_item_features: bool = True
    item_id_embedding: bool = True          # DSSM: the item id as an input of the item MLP
    multi_pooling: MultiPooling = "mean"    # multi-valued features (genres, tags): mean or sum of embeddings
    tie_embeddings: bool = True             # the history table IS the item output table while training
    user_id_dropout: Fraction = 0.1         # share of examples whose user id is replaced by the OOV row
    # negatives and loss
    negatives: Negatives = "mixed"
    loss: LossName = "softmax"              # ("none" negatives -> positive-only)
    num_negatives: PositiveInt = 256        # extra sampled items per batch (uniform/popularity/mixed/hard)
    hard_negatives: PositiveInt = 256       # hard: negatives kept per row (64 -> 0.35, 256 -> 0.49 on ML-100k)
    popularity_alpha: NonNegativeFloat = 0.75
    logq_correction: bool = True
    # also mask candidates from the user's training history. Always on for "hard": the highest-scoring
    # non-positives are mostly the user's own past items, and pushing them down wrecks the model
    mask_history_hits: bool = False
    # optimisation
    epochs: PositiveInt = 4                 # with the cosine schedule: the length of the decay
    batch_size: Annotated[int, Field(ge=2)] = 512  # a lone row has no in-batch negative
    lr: PositiveFloat = 3e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: decays to 0 at the last epoch
    weight_decay: NonNegativeFloat = 0.0
    patience: PositiveInt = 3               # epochs without a better valid HR@K before stopping
    eval_k: PositiveInt = 50
    seed: int = 0
    # execution
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: PositiveInt | None = None  # torch CPU threads; None = the idle cores (>= 1)
    quiet: bool = False
    resume: str | None = None               # a model version, or "latest": continue that run
    stop_after_epoch: NonNegativeInt | None = None  # stop (as if interrupted) after this epoch; for resume tests

    @model_validator(mode="before")
    @classmethod
    def _emb_dim_defaults_to_dim(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("emb_dim") is None:
            values = {**values, "emb_dim": values.get("dim", cls.model_fields["dim"].default)}
        return values

    def tower_config(self) -> Any:
        """The towers' config: every TowerConfig field this config has, by name."""
        from dataclasses import fields

        from towers.model import TowerConfig

        return TowerConfig(**{f.name: getattr(self, f.name) for f in fields(TowerConfig)
                              if f.name in type(self).model_fields})
