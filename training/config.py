"""The training job's configuration: one pydantic model with every default and every constraint
(no heavy imports, so the CLI can read the defaults for ``--help`` without loading torch or pandas).

A new knob is one line here, its constraint being its type (``towers.validation``); the CLI flag
is one ``add_flag`` line in ``training/cli.py``, which takes the default, parser and choices from
this line. ``tower_config()`` passes every field whose name is a ``TowerConfig`` field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from towers import HistoryEncoder, ModelName, MultiPooling
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
_RUNTIME_FIELDS = ("artifacts", "device", "quiet", "num_threads", "stop_after_epoch", "resume", "pause_at",
                   "loader_workers")
EmbeddingOptimizer = Literal["rowwise_adagrad", "sparse_adam", "adamw"]
ItemInit = Literal["random", "transitions"]
EMBEDDING_OPTIMIZERS: tuple[str, ...] = get_args(EmbeddingOptimizer)
# the towers' hidden layers when none are given, by model: YoutubeDNN a linear map, DSSM one ReLU layer
MODEL_HIDDEN: dict[str, tuple[int, ...]] = {"youtubednn": (), "dssm": (256,)}
# row-wise Adagrad's learning rate when none is given (the Adam-style ones default to ``lr``): 0.1 had
# the best validation HR@50 of 0.01, 0.03, 0.1, 0.3 for both YoutubeDNN and DSSM on ML-100k
ROWWISE_ADAGRAD_LR = 0.1
# interests per user with the attention encoder: 3 beat 1 on three of the four quality datasets and
# tied on ML-100k (test HR@50 0.361 -> 0.391 synthetic-longtail, 0.476 -> 0.490 synthetic-short,
# 0.320 -> 0.344 ml-latest-small, 0.5355 -> 0.533 ml-100k); BENCHMARKS.md, "what each option adds"
DEFAULT_INTERESTS = 3


class TrainConfig(JobConfig):
    """Every knob of the training job, with defaults chosen by the worst ratio to EASE over the quality
    benchmark's datasets (BENCHMARKS.md); ``None`` marks a knob derived from the data at train time."""

    # data
    data: str = "synthetic"                 # "synthetic" | "movielens:DIR" | "csv:DIR"
    data_options: dict[str, Any] = Field(default_factory=dict)  # synthetic size options for load_data
    artifacts: str = "artifacts"
    # data larger than memory (training/stream.py): csv:DIR with DIR/interactions/ part files is
    # streamed by itself; stream=True streams a single large DIR/interactions.csv too
    stream: bool = False
    shard_rows: PositiveInt = 1_000_000     # streamed: about this many interactions per shard (memory)
    eval_users: PositiveInt = 10_000        # streamed: users in the validation / test sample
    # model
    model: ModelName = "youtubednn"
    dim: PositiveInt = 64                   # output (retrieval) dimension
    emb_dim: PositiveInt | None = None      # id/history embedding width; None = dim (needed for tying)
    feature_dim: PositiveInt = 16
    # the towers' MLP hidden layers; None: by model (MODEL_HIDDEN). YoutubeDNN's towers default to
    # one linear layer over the pooled history and features: with the temperature at 0.12 that beat a
    # 256-unit ReLU layer on all four quality datasets (BENCHMARKS.md, "what each option adds")
    hidden: tuple[PositiveInt, ...] | None = None
    dropout: Fraction = 0.0
    temperature: PositiveFloat = 0.12       # logits = cosine / T; 0.12 had the best worst-case ratio to EASE of 0.05-0.15
    # None = derived from the data at train time (training/defaults.py; logged and kept in config.json)
    history_len: PositiveInt | None = None  # items the user tower reads; None: from the users' history lengths
    history_encoder: HistoryEncoder = "attention"  # how the user tower pools the history (towers.model)
    recency_half_life: PositiveFloat = 8.0  # recency: the starting half-life of its learned weights, in items
    attention_heads: PositiveInt = 2        # transformer: heads per layer
    attention_layers: PositiveInt = 1       # transformer: layers
    use_user_id: bool | None = None         # a per-user id embedding; None: on when users have long histories
    use_history: bool = True
    use_user_features: bool = True
    use_item_features: bool = True
    item_id_embedding: bool = True          # DSSM: the item id as an input of the item MLP
    multi_pooling: MultiPooling = "mean"    # multi-valued features (genres, tags): mean or sum of embeddings
    tie_embeddings: bool = True             # the history table IS the item output table while training
    # the item id table's starting rows: random, or a spectral embedding of the graph of items users had
    # one right after the other (training/item_init.py; data held in memory only)
    item_init: ItemInit = "random"
    # user vectors per user (attention pooling only): K > 1 pools K interests, each searched, the
    # results merged by score. None: DEFAULT_INTERESTS with the attention encoder, else 1
    interests: PositiveInt | None = None
    user_id_dropout: Fraction = 0.1         # share of examples whose user id is replaced by the OOV row
    # recall adds weight * cosine(last, item) over the pairs of items that sat next to each other in
    # the histories (towers/neighbours.py). None: chosen on the validation split after training, 0 among
    # the choices (training/blend.py; a streamed source keeps 0); a number fixes it, 0 turns it off
    neighbour_weight: NonNegativeFloat | None = None
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
    epochs: PositiveInt | None = None       # with the cosine schedule: the length of the decay; None: from the data size
    batch_size: Annotated[int, Field(ge=2)] = 512  # a lone row has no in-batch negative
    max_steps: PositiveInt | None = None    # a budget: at most this many optimiser steps in all
    lr: PositiveFloat = 3e-3                # AdamW on the dense parameters (MLPs, side-feature tables)
    # the id tables (user ids, history and item ids) learn row-sparse: only the rows a batch touched
    embedding_optimizer: EmbeddingOptimizer = "rowwise_adagrad"  # adamw: every row every step (the reference)
    embedding_lr: PositiveFloat | None = None  # None: ROWWISE_ADAGRAD_LR for rowwise_adagrad, else lr
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
    # "EPOCH:STEP": after that step, write <version dir>/paused-<rank> and wait to be killed (tests that
    # kill a run at a known point wait on that file instead of racing the clock)
    pause_at: Annotated[str, Field(pattern=r"^\d+:\d+$")] | None = None
    loader_workers: NonNegativeInt = 0      # DataLoader processes building batches ahead of the step

    @model_validator(mode="before")
    @classmethod
    def _defaults_that_follow_other_fields(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("emb_dim") is None:
            values = {**values, "emb_dim": values.get("dim", cls.model_fields["dim"].default)}
        if isinstance(values, dict) and values.get("hidden") is None:
            model = values.get("model", cls.model_fields["model"].default)
            values = {**values, "hidden": MODEL_HIDDEN.get(model, (256,))}
        if isinstance(values, dict) and values.get("interests") is None:
            attention = (values.get("history_encoder", cls.model_fields["history_encoder"].default) == "attention"
                         and values.get("use_history", True) is not False)
            values = {**values, "interests": DEFAULT_INTERESTS if attention else 1}
        return values

    @field_validator("interests")
    @classmethod
    def _interests_need_attention(cls, v: int | None, info: ValidationInfo) -> int | None:
        enc, hist = info.data.get("history_encoder"), info.data.get("use_history")
        if v is not None and v > 1 and (enc != "attention" or not hist):
            raise ValueError(f"1 unless history_encoder is 'attention' and use_history is on "
                             f"(history_encoder is {enc!r}, use_history {hist})")
        return v

    @property
    def table_lr(self) -> float:
        """The id tables' learning rate."""
        if self.embedding_lr is not None:
            return float(self.embedding_lr)
        return ROWWISE_ADAGRAD_LR if self.embedding_optimizer == "rowwise_adagrad" else float(self.lr)

    def tower_config(self) -> Any:
        """The towers' config: every TowerConfig field this config has, by name."""
        from dataclasses import fields

        from towers.model import TowerConfig

        # a setting still unset (None: derived from the data when the job runs) keeps the towers' default
        return TowerConfig(**{f.name: getattr(self, f.name) for f in fields(TowerConfig)
                              if f.name in type(self).model_fields and getattr(self, f.name) is not None})
