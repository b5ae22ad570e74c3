"""The shared contract: feature encoding, the tower modules, the checkpoint format and the artifact
plumbing (version names, paths inside the artifacts root, durable atomic writes).

The names below are the one list of each: the towers, the training job's CLI and config, and the
demo all take them from here (this module imports nothing, so a CLI can list them for ``--help``
without loading torch).
"""

from typing import Literal, get_args

ModelName = Literal["youtubednn", "dssm"]
MODELS: tuple[str, ...] = get_args(ModelName)
# pooling of a multi-valued feature (genres, tags) by its EmbeddingBag
MultiPooling = Literal["mean", "sum"]
MULTI_POOLINGS: tuple[str, ...] = get_args(MultiPooling)
# how the user tower pools the user's history (towers.model's encoder modules)
HistoryEncoder = Literal["mean", "recency", "attention", "transformer"]
HISTORY_ENCODERS: tuple[str, ...] = get_args(HistoryEncoder)
