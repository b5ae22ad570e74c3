"""Train torch-rechub 0.9.0's DSSM and YoutubeDNN the way its own MovieLens examples do, on OUR split.

Runs INSIDE the separate virtualenv that ``benchmarks/quality.py`` creates (torch==2.13.0, then
torch-rechub==0.9.0 from PyPI); it imports nothing from this repository. It writes user and item
embeddings so the project's one exact evaluator scores them on exactly the same users and targets
as every other model.

Reference recipes (datawhalechina/torch-rechub, examples/matching/):
- run_ml_dssm.py: sparse user features [user_id, gender, age, occupation, zip] + mean-pooled
  ``hist_movie_id`` (max 50, shared with movie_id), item features [movie_id, cate_id = first genre],
  embed_dim 16; ``generate_seq_feature_match(sample_method=1 (count**0.75 popularity), mode=0
  (point-wise), neg_ratio=3)``; DSSM(temperature=0.02, towers [256, 128, 64] with PReLU);
  MatchTrainer(mode=0) (BCE), Adam lr 1e-4, weight_decay 1e-6, 10 epochs, batch 4096, seed 2022.
- run_ml_youtube_dnn.py: same user side; item = movie_id only; ``mode=2`` (list-wise) with 3
  popularity-sampled negatives per positive in ``neg_items``; YoutubeDNN(user dims [128, 64, 16],
  temperature 0.02); MatchTrainer(mode=2) (softmax CE), Adam lr 1e-4, weight_decay 1e-6,
  10 epochs, batch 2048, seed 2022.

How our split maps onto theirs: the input holds each user's train AND valid rows, with a
``timestamp`` that is the row's position in our (timestamp, row order) timeline, so their
``generate_seq_feature_match`` (which holds out each user's LAST row as its own test sample) holds
out exactly our valid row and trains on exactly our train rows. The user embedding for evaluation
reads the history before OUR test target (train + valid, last 50), like our own towers.
Deliberate deviations (each needed to score the full catalogue on our split): the movie_id and
cate_id vocabularies cover the whole catalogue (items with no train rows keep their initial
embedding); numpy/random are seeded too (the examples seed torch only).

Input directory (written by quality.py): interactions.csv (user_id, item_id, timestamp),
users.csv (user_id, gender, age, occupation, zip), items.csv (item_id, cate_id) in catalogue order,
eval_users.csv (user_id, hist = "|"-joined item ids, oldest first).
Output: <out>/<model>.npz with user_ids, user_emb (U, D), item_ids, item_emb (N, D) and a
<out>/<model>.json with timings (prep_s, fit_s, infer_s, train_s = prep_s + fit_s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_rechub.basic.features import SequenceFeature, SparseFeature
from torch_rechub.models.matching import DSSM, YoutubeDNN
from torch_rechub.trainers import MatchTrainer
from torch_rechub.utils.data import MatchDataGenerator, df_to_dict
from torch_rechub.utils.match import gen_model_input, generate_seq_feature_match

USER_COLS = ["user_id", "gender", "age", "occupation", "zip"]
SEQ_MAX_LEN = 50
EMBED_DIM = 16
SEED = 2022

# the examples' argparse defaults
RECIPES = {
    "dssm": {"epoch": 10, "learning_rate": 1e-4, "batch_size": 4096, "weight_decay": 1e-6, "mode": 0},
    "youtubednn": {"epoch": 10, "learning_rate": 1e-4, "batch_size": 2048, "weight_decay": 1e-6, "mode": 2},
}


def _encode(values: pd.Series, vocab: list[str]) -> np.ndarray:
    """Label-encode like the examples (sorted vocabulary, codes start at 1, 0 = padding)."""
    lookup = {v: i + 1 for i, v in enumerate(vocab)}
    return values.map(lookup).fillna(0).astype("int64").to_numpy()


def load_inputs(inp: Path) -> dict:
    inter = pd.read_csv(inp / "interactions.csv", dtype={"user_id": str, "item_id": str})
    users = pd.read_csv(inp / "users.csv", dtype=str, keep_default_na=False)
    items = pd.read_csv(inp / "items.csv", dtype=str, keep_default_na=False)
    evu = pd.read_csv(inp / "eval_users.csv", dtype=str, keep_default_na=False)

    item_vocab = sorted(items["item_id"].unique())
    user_vocab = sorted(set(users["user_id"]) | set(inter["user_id"]) | set(evu["user_id"]))
    feature_max_idx: dict[str, int] = {"movie_id": len(item_vocab) + 1, "user_id": len(user_vocab) + 1}

    user_profile = pd.DataFrame({"user_id": _encode(users["user_id"], user_vocab)})
    for col in USER_COLS[1:]:
        vocab = sorted(users[col].unique())
        user_profile[col] = _encode(users[col], vocab)
        feature_max_idx[col] = len(vocab) + 1
    cate_vocab = sorted(items["cate_id"].unique())
    item_profile = pd.DataFrame({"movie_id": _encode(items["item_id"], item_vocab),
                                 "cate_id": _encode(items["cate_id"], cate_vocab)})
    feature_max_idx["cate_id"] = len(cate_vocab) + 1

    data = pd.DataFrame({"user_id": _encode(inter["user_id"], user_vocab),
                         "movie_id": _encode(inter["item_id"], item_vocab),
                         "timestamp": inter["timestamp"].astype("int64").to_numpy()})
    if (data["movie_id"] == 0).any():
        raise SystemExit("interactions name items missing from items.csv")

    # evaluation users: history before our test target, newest last
    item_code = {v: i + 1 for i, v in enumerate(item_vocab)}
    hists = [[item_code[t] for t in h.split("|") if t in item_code] if h else [] for h in evu["hist"]]
    eval_df = pd.DataFrame({
        "user_id": _encode(evu["user_id"], user_vocab),
        # the user tower never reads movie_id; the last history item keeps the merge well-typed
        "movie_id": [h[-1] if h else 0 for h in hists],
        "hist_movie_id": hists,
        "histlen_movie_id": [len(h) for h in hists],
    })
    return {"data": data, "user_profile": user_profile, "item_profile": item_profile,
            "feature_max_idx": feature_max_idx, "eval_df": eval_df, "eval_user_ids": evu["user_id"].tolist(),
            "item_ids": items["item_id"].tolist()}


def _user_features(fmi: dict[str, int]) -> list:
    feats = [SparseFeature(name, vocab_size=fmi[name], embed_dim=EMBED_DIM) for name in USER_COLS]
    feats.append(SequenceFeature("hist_movie_id", vocab_size=fmi["movie_id"], embed_dim=EMBED_DIM,
                                 pooling="mean", shared_with="movie_id"))
    return feats


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the DataLoader workers):
    unlike wall time it barely moves when other jobs share the cores."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def train_one(name: str, inputs: dict, workdir: Path, num_workers: int | None, epochs: int | None) -> dict:
    recipe = dict(RECIPES[name])
    if epochs is not None:
        recipe["epoch"] = epochs
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    fmi = inputs["feature_max_idx"]
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    df_train, _their_test = generate_seq_feature_match(
        inputs["data"].copy(), "user_id", "movie_id", time_col="timestamp", item_attribute_cols=[],
        sample_method=1, mode=recipe["mode"], neg_ratio=3, min_item=0)
    x_train = gen_model_input(df_train, inputs["user_profile"], "user_id", inputs["item_profile"], "movie_id",
                              seq_max_len=SEQ_MAX_LEN)
    if name == "dssm":
        y_train = x_train["label"]
        item_features = [SparseFeature(n, vocab_size=fmi[n], embed_dim=EMBED_DIM) for n in ("movie_id", "cate_id")]
        model = DSSM(_user_features(fmi), item_features, temperature=0.02,
                     user_params={"dims": [256, 128, 64], "activation": "prelu"},
                     item_params={"dims": [256, 128, 64], "activation": "prelu"})
    else:
        y_train = np.array([0] * df_train.shape[0])  # list-wise: the positive is always column 0
        item_features = [SparseFeature("movie_id", vocab_size=fmi["movie_id"], embed_dim=EMBED_DIM)]
        neg_feature = [SequenceFeature("neg_items", vocab_size=fmi["movie_id"], embed_dim=EMBED_DIM,
                                       pooling="concat", shared_with="movie_id")]
        model = YoutubeDNN(_user_features(fmi), item_features, neg_feature, user_params={"dims": [128, 64, 16]},
                           temperature=0.02)
    eval_x = gen_model_input(inputs["eval_df"], inputs["user_profile"], "user_id", inputs["item_profile"],
                             "movie_id", seq_max_len=SEQ_MAX_LEN)
    all_item = df_to_dict(inputs["item_profile"])
    dg = MatchDataGenerator(x=x_train, y=y_train)
    dl_kwargs = {} if num_workers is None else {"num_workers": num_workers}
    train_dl, user_dl, item_dl = dg.generate_dataloader(eval_x, all_item, batch_size=recipe["batch_size"], **dl_kwargs)
    prep_s = time.perf_counter() - t0

    save_dir = workdir / name
    save_dir.mkdir(parents=True, exist_ok=True)
    trainer = MatchTrainer(model, mode=recipe["mode"],
                           optimizer_params={"lr": recipe["learning_rate"], "weight_decay": recipe["weight_decay"]},
                           n_epoch=recipe["epoch"], device="cpu", model_path=str(save_dir))
    t1 = time.perf_counter()
    trainer.fit(train_dl)
    fit_s = time.perf_counter() - t1
    train_cpu_s = cpu_seconds() - c0

    t2 = time.perf_counter()
    user_emb = trainer.inference_embedding(model=model, mode="user", data_loader=user_dl, model_path=str(save_dir))
    item_emb = trainer.inference_embedding(model=model, mode="item", data_loader=item_dl, model_path=str(save_dir))
    infer_s = time.perf_counter() - t2
    return {"user_emb": user_emb.cpu().numpy().astype(np.float32), "item_emb": item_emb.cpu().numpy().astype(np.float32),
            "timing": {"prep_s": prep_s, "fit_s": fit_s, "infer_s": infer_s, "train_s": prep_s + fit_s,
                       "train_cpu_s": train_cpu_s,
                       "n_train_samples": int(len(y_train)), "num_workers": num_workers if num_workers is not None else 8,
                       **recipe}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--models", default="dssm,youtubednn")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="DataLoader workers (default: the examples' MatchDataGenerator default, 8)")
    ap.add_argument("--epochs", type=int, default=None, help="override the examples' 10 epochs (smoke tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch_rechub

    args.output.mkdir(parents=True, exist_ok=True)
    inputs = load_inputs(args.input)
    with tempfile.TemporaryDirectory(prefix="rechub-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in RECIPES:
                raise SystemExit(f"unknown model {name!r} (choose from {', '.join(RECIPES)})")
            out = train_one(name, inputs, Path(tmp), args.num_workers, args.epochs)
            np.savez(args.output / f"{name}.npz", user_ids=np.array(inputs["eval_user_ids"], dtype=object),
                     user_emb=out["user_emb"], item_ids=np.array(inputs["item_ids"], dtype=object),
                     item_emb=out["item_emb"])
            meta = {"model": name, "torch_rechub": getattr(torch_rechub, "__version__", "0.9.0"),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "pid": os.getpid(),
                    **out["timing"]}
            (args.output / f"{name}.json").write_text(json.dumps(meta, indent=2))
            print(f"rechub {name}: train {meta['train_s']:.1f}s (prep {meta['prep_s']:.1f}s, fit {meta['fit_s']:.1f}s)",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
