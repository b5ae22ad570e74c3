"""Multi-interest users: what one user vector misses, and what several recover, side by side in one run.

    python benchmarks/interests.py                                   # synthetic-longtail, 1 and 3 interests
    python benchmarks/interests.py --dataset synthetic-short --interests 1,2,3,4

The synthetic shapes' generator knows how every interaction was drawn (benchmarks/datasets.py): a
pick from one of the user's topics, a neighbour of the previous item, or a popular item from
anywhere. This script trains the shipped defaults with each number of interests on the same split,
fits EASE (lambda 500) on it, and breaks test HR@50 (seen items masked) down by how the held-out
item was drawn and by the share of the user's history that lies in the held-out item's topic: a
user vector pooled from a history that is 90 % one topic ranks the other 10 % badly, where EASE,
which sums item-to-item weights over the history, does not.

Then the training loss's multi-interest partition (``training.losses._InterestPartition``, one
fused forward and backward) against the same loss written with autograd, and the single-vector
loss, forward + backward per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import datasets as bench_data  # noqa: E402
from datasets import next_item_probability  # noqa: E402

from training.baselines import DEFAULT_EASE_LAMBDA, ease_dtype, ease_scorer, fit_ease  # noqa: E402
from training.data import load_data, split_leave_last_out  # noqa: E402
from training.evaluate import build_eval_set, evaluate_scores, model_scorer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHARE_BINS = [(0.0, 0.3, "under 30 %"), (0.3, 0.6, "30-60 %"), (0.6, 0.9, "60-90 %"), (0.9, 1.01, "90 % or more")]
KIND_NAMES = {bench_data.KIND_TOPIC: "a pick from one of the user's topics",
              bench_data.KIND_NEXT: "a neighbour of the previous item",
              bench_data.KIND_NOISE: "a popular item from anywhere"}


def target_truth(name: str, ev: Any) -> tuple[np.ndarray, np.ndarray]:
    """(kind (U,), topic share (U,)) of each test user's held-out item, in ``ev.user_ids`` order."""
    inter, items = bench_data.generate(bench_data.SHAPES[name], truth=True)
    kind_of = inter.set_index(["user_id", "item_id"])["kind"]  # (user, item) pairs are unique
    topic = items.set_index("item_id")["topic"].reindex(ev.item_ids).to_numpy()  # by catalogue column
    tcol = ev.target_cols[ev.target_indptr[:-1]]  # one test item per user
    kinds = kind_of.reindex(pd.MultiIndex.from_arrays([ev.user_ids, ev.item_ids[tcol]])).to_numpy()
    share = np.array([float(np.mean(topic[ev.hist_cols[ev.hist_indptr[i]:ev.hist_indptr[i + 1]]] == topic[c]))
                      if ev.hist_indptr[i + 1] > ev.hist_indptr[i] else 0.0 for i, c in enumerate(tcol)])
    return kinds.astype(np.int64), share


def ceiling_scorer(name: str, ev: Any) -> Any:
    """Scores by the generator's own probability of each item being the user's next step
    (``datasets.next_item_probability``): the best ranking any model can reach on this shape."""
    import torch

    shape = bench_data.SHAPES[name]
    w = bench_data.world(shape)
    gen_item = np.asarray(ev.item_ids, dtype=np.int64) - 1  # catalogue column -> generator item
    gen_user = np.array([int(str(u)[1:]) for u in ev.user_ids])  # the generator's "u<n>" ids

    def score(users: np.ndarray) -> Any:
        out = np.zeros((len(users), len(gen_item)), dtype=np.float32)
        for r, i in enumerate(users):
            lo, hi = ev.hist_indptr[i], ev.hist_indptr[i + 1]
            if hi > lo:  # every synthetic user has history before the target (min_len >= 3)
                out[r] = next_item_probability(shape, w, int(gen_user[i]), int(gen_item[ev.hist_cols[hi - 1]]))[gen_item]
        return torch.from_numpy(out)

    return score


def transitions_scorer(ev: Any, two_step_weight: float = 0.1) -> Any:
    """A plain sequential baseline from the data alone: how often each item sat next to the user's
    last item in anyone's history (either direction), plus ``two_step_weight`` times the same count
    two steps away. Not tuned (one weight, written down before it ran)."""
    import torch

    from training.item_init import transition_graph

    n = ev.n_items
    # consecutive entries of the histories (each user's in time order), never across two users
    within = np.ones(len(ev.hist_cols) - 1, dtype=bool) if len(ev.hist_cols) else np.zeros(0, dtype=bool)
    ends = ev.hist_indptr[1:-1] - 1  # a user's last item -> the next user's first
    within[ends[(ends >= 0) & (ends < len(within))]] = False
    adj = transition_graph(ev.hist_cols[:-1][within], ev.hist_cols[1:][within], n)
    last = torch.from_numpy(ev.hist_cols[ev.hist_indptr[1:] - 1].astype(np.int64))

    def score(users: np.ndarray) -> Any:
        sel = torch.zeros(len(users), n)
        sel[torch.arange(len(users)), last[users]] = 1.0  # one-hot of each user's last item
        one = torch.sparse.mm(adj, sel.T).T  # (B, N) neighbours' counts (the matrix is symmetric)
        return one + two_step_weight * torch.sparse.mm(adj, one.T).T

    return score


def train_and_score(spec: str, data: Any, ev: Any, interests: int, workdir: Path) -> tuple[np.ndarray, float]:
    from towers.checkpoint import load_checkpoint
    from training.train import TrainConfig
    from training.train import run as train_run

    cfg = TrainConfig.from_dict({"data": spec, "artifacts": str(workdir / f"k{interests}"), "quiet": True,
                                 "interests": interests})
    t0 = time.perf_counter()
    res = train_run(cfg)
    secs = time.perf_counter() - t0
    model = load_checkpoint(res.model_path)
    got = evaluate_scores(model_scorer(model, data, ev), ev, ks=(50,), mask_seen="masked", per_user=True)
    return got["per_user"]["masked"]["HR@50"], secs


def loss_timing(interests: list[int], repeats: int = 30) -> list[dict[str, Any]]:
    """Forward + backward of one step's loss: the fused partition and autograd, per number of interests."""
    import torch
    import torch.nn.functional as F

    from training import losses
    from training.losses import retrieval_loss

    B, C, D, t = 512, 768, 64, 0.12
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 5000, (C,), generator=gen)
    logq = torch.randn(C, generator=gen)

    def autograd_loss(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        logits = torch.logsumexp(torch.einsum("bkd,cd->bkc", u, v) / t, dim=1) - logq  # (B, C)
        hit = rows.unsqueeze(0) == rows[:B].unsqueeze(1)
        hit.fill_diagonal_(False)
        return F.cross_entropy(logits.masked_fill(hit, float("-inf")), torch.arange(B))

    def clock(fn: Any) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1e3

    none = torch.zeros(B, C, dtype=torch.bool)
    out = []
    for k in interests:
        u = F.normalize(torch.randn(B, k, D, generator=gen), dim=-1)
        v = F.normalize(torch.randn(C, D, generator=gen), dim=-1).requires_grad_()
        uk = (u[:, 0] if k == 1 else u).clone().requires_grad_()
        ua = u.clone().requires_grad_()
        fused = clock(lambda uk=uk, v=v: retrieval_loss(uk, v, rows, logq, temperature=t).backward())
        auto = clock(lambda ua=ua, v=v: autograd_loss(ua, v).backward())
        # the two hand-written parts of the fused path, each undone alone: a fresh block every step
        # (no reuse), and the dense (B, C) excluded mask (an all-False history mask forces it)
        keep, losses._BLOCKS.keep = losses._BLOCKS.keep, 0
        try:
            fresh = clock(lambda uk=uk, v=v: retrieval_loss(uk, v, rows, logq, temperature=t).backward())
        finally:
            losses._BLOCKS.keep = keep
        dense = clock(lambda uk=uk, v=v: retrieval_loss(uk, v, rows, logq, temperature=t,
                                                        history_mask=none).backward())
        out.append({"interests": k, "fused_ms": fused, "autograd_ms": auto, "fresh_blocks_ms": fresh,
                    "dense_mask_ms": dense})
    return out


# One step of the attention history encoder (forward + backward, 512 users x 50 items x 64, 3
# interests, 1 thread), in a process of its own: the allocator setting is process-wide.
# argv: "shipped" | "textbook" (tanh and indexing, as the encoder was written before), then
# "reuse" | "default" (training.memory.reuse_freed_blocks applied or not), then the repeats.
_ENCODER_PROBE = r"""
import json, resource, sys, time
import torch
from towers.model import AttentionHistory, history_ages
from training.memory import reuse_freed_blocks
form, alloc, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
applied = reuse_freed_blocks() if alloc == "reuse" else None
torch.set_num_threads(1)
torch.manual_seed(0)
enc = AttentionHistory(64, 50, 3)
table = torch.nn.Parameter(torch.randn(20_000, 64) * 0.05)
rows = torch.randint(1, 20_000, (512, 50))
rows[torch.arange(50)[None, :] >= torch.randint(5, 51, (512, 1))] = 0

def textbook(table, rows):
    e = table[rows]
    h = torch.tanh(enc.proj(e + enc.age(history_ages(rows))))
    a = torch.softmax(enc.score(h).masked_fill((rows == 0).unsqueeze(-1), -1e9), dim=1)
    return torch.einsum("blk,ble->bke", a, e)

fn = enc if form == "shipped" else textbook
def step():
    table.grad = None
    fn(table, rows).pow(2).sum().backward()
for _ in range(3):
    step()
f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(repeats):
    step()
print(json.dumps({"applied": applied, "ms": (time.perf_counter() - t0) / repeats * 1e3,
                  "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / repeats}))
"""


def encoder_step(form: str, alloc: str, repeats: int) -> dict[str, Any]:
    """{"applied", "ms", "faults"} per step of the encoder probe (``_ENCODER_PROBE``), in a new process."""
    res = subprocess.run([sys.executable, "-c", _ENCODER_PROBE, form, alloc, str(repeats)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return {"form": form, "alloc": alloc, **json.loads(res.stdout.strip().splitlines()[-1])}


def encoder_timing(repeats: int = 30) -> list[dict[str, Any]]:
    """The attention encoder's step as shipped, and with each of its two speed-ups undone alone."""
    return [encoder_step(form, alloc, repeats)
            for form, alloc in (("shipped", "reuse"), ("shipped", "default"), ("textbook", "reuse"),
                                ("textbook", "default"))]


def groups(hits: dict[str, np.ndarray], kinds: np.ndarray, share: np.ndarray) -> list[dict[str, Any]]:
    """HR@50 of every model over each group of test users (all; by kind; topic picks by share)."""
    sels = [("**all**", np.ones(len(kinds), dtype=bool))]
    sels += [(label, kinds == k) for k, label in KIND_NAMES.items()]
    sels += [(f"topic picks, target's topic is {label} of the history",
              (kinds == bench_data.KIND_TOPIC) & (share >= lo) & (share < hi)) for lo, hi, label in SHARE_BINS]
    return [{"label": label, "n": int(sel.sum()),
             "hr": {c: float(np.mean(h[sel])) if sel.any() else None for c, h in hits.items()}} for label, sel in sels]


def render(doc: dict[str, Any]) -> str:
    ks = doc["interests"]
    cols = ["EASE", *[f"{k} interest{'s' if k > 1 else ''}" for k in ks]]
    diag = [c for c in ("transitions", "ceiling") if c in doc["groups"][0]["hr"]]  # runs before 2026-12-07 lack them
    heads = cols + [{"transitions": "last item's neighbours", "ceiling": "ceiling"}[c] for c in diag]
    cols = cols + diag
    lines = [f"## Multi-interest users: {doc['dataset']}, by how the held-out item was drawn", "",
             f"Run {doc['when']} with `{doc['command']}` (1-min load average {doc['load'][0]:.1f} at the start, "
             f"{doc['load'][1]:.1f} at the end; {doc['threads']} torch threads). Test HR@50, seen items masked, "
             f"{doc['users']:,} test users; every model trained with the shipped defaults on the same split, "
             "only the number of interests differs. Groups come from the generator's own record of each "
             "interaction (not an input of any model).", "",
             "| test item | users | " + " | ".join(heads) + " |", "|---" * (len(cols) + 2) + "|"]

    for g in doc["groups"]:
        vals = [f"{g['hr'][c]:.3f}" if g["n"] else "-" for c in cols]
        lines.append(f"| {g['label']} | {g['n']:,} | " + " | ".join(vals) + " |")
    lines.append("| train s | | " + " | ".join(["-", *[f"{doc['train_s'][c]:.1f}" if c in doc["train_s"] else "-"
                                                        for c in cols[1:]]]) + " |")
    if diag:
        lines += ["", "Two columns beside the models, for what is left to win: **last item's neighbours** counts how "
                  "often each item sat next to the user's last item in anyone's history (either direction; plus 0.1 "
                  "times the same count two steps away; from the data alone, one weight written down before it "
                  "ran). **ceiling** ranks by the generator's own probability of each item being the user's next "
                  "step (`datasets.next_item_probability`: the user's true topics and weights, the true "
                  "popularity, the true walk order), the best any model can do on this split. The gap between "
                  "the models and the first, on a neighbour of the previous item, is signal the data holds that "
                  "the towers do not yet learn."]
    again = (f" Measured again {doc['loss_when']} with `{doc['loss_command']}` (1-min load average "
             f"{doc['loss_load'][0]:.1f} at the start, {doc['loss_load'][1]:.1f} at the end), after a change to the "
             "loss; the rest of this page is from the run above.") if doc.get("loss_when") else ""
    lines += ["", "The training loss per step (forward + backward; 512 users against 768 candidates, dim 64, "
              f"temperature 0.12; mean of {doc['loss_repeats']} steps; the training job's allocator settings, "
              f"`training.memory.reuse_freed_blocks`).{again}", "",
              "| interests | `_InterestPartition` (fused) ms | autograd ms | autograd / fused | "
              "fused, a fresh block each step ms | fused, dense excluded mask ms |",
              "|---|---|---|---|---|---|"]
    for r in doc["loss"]:
        fused_name = "fused" if r["interests"] > 1 else "`_SoftmaxPartition`"
        extra = [f"{r[key]:.2f} ({r[key] / r['fused_ms']:.2f}x)" if key in r else "-"
                 for key in ("fresh_blocks_ms", "dense_mask_ms")]
        lines.append(f"| {r['interests']} | {r['fused_ms']:.2f} ({fused_name}) | {r['autograd_ms']:.2f} | "
                     f"{r['autograd_ms'] / r['fused_ms']:.2f}x | {extra[0]} | {extra[1]} |")
    if any("fresh_blocks_ms" in r for r in doc["loss"]):
        lines += ["", "The last two columns undo one hand-written part of the fused loss each "
                  "(`training/losses.py`): `_Blocks` (one step's (B, C) blocks reused by the next, where a fresh "
                  "block's first writes are page faults) and the listed excluded cells (`_excluded_cells`, where "
                  "a dense (B, C) comparison and a boolean `masked_fill_` cost more than the block's `exp`)."]
    if doc.get("encoder"):
        base = doc["encoder"][0]["ms"]
        label = {("shipped", "reuse"): "as shipped", ("shipped", "default"): "glibc's default allocator",
                 ("textbook", "reuse"): "tanh and indexing", ("textbook", "default"): "both undone (as before)"}
        lines += ["", "The attention history encoder per step (forward + backward; 512 users x 50 items x 64, "
                  f"3 interests, 1 thread; mean of {doc['loss_repeats']} steps, each form in a process of its own):",
                  "", "| encoder | ms | / as shipped | page faults per step |", "|---|---|---|---|"]
        for r in doc["encoder"]:
            lines.append(f"| {label[(r['form'], r['alloc'])]} | {r['ms']:.2f} | {r['ms'] / base:.2f}x | {r['faults']:,.0f} |")
        lines += ["", "Its two hand-written parts: the scorer computed as 2 score(sigmoid(2 x)) instead of "
                  "score(tanh(x)) (the same attention: the constant it drops cancels in the softmax; torch's CPU "
                  "tanh costs ~5x its sigmoid) with `F.embedding` gathers instead of indexing (`towers/model.py`), "
                  "and `training.memory.reuse_freed_blocks` (glibc keeps a step's freed blocks for the next one "
                  "instead of faulting new pages in; the training job applies it at start)."]
    lines += ["", "- One vector is pooled from the history in proportion to it, so the share of a minority "
              "topic decides how far the vector leans its way: the first topic-share rows are where one "
              "vector falls behind EASE, and where several interests catch up.",
              "- Serving ranks by the best interest (`max_k u_k . v`) and searches once per interest "
              "(`index.searcher.search_users`); training uses the soft maximum (`logsumexp`), which the "
              "maximum bounds within log K."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="synthetic-longtail", choices=list(bench_data.SHAPES))
    ap.add_argument("--interests", default="1,3", help="comma-separated numbers of interests to train")
    ap.add_argument("--out", type=Path, default=RESULTS / "interests.md")
    ap.add_argument("--repeats", type=int, default=30, help="loss timing: steps per measurement")
    ap.add_argument("--loss-only", action="store_true",
                    help="measure only the step timings (loss, encoder) again and re-render the stored run with them")
    args = ap.parse_args(argv)
    ks = [int(x) for x in args.interests.split(",") if x]
    import torch

    from training.memory import reuse_freed_blocks
    from training.train import idle_cores

    reuse_freed_blocks()  # the loss is timed under the training job's allocator settings
    threads = int(idle_cores())
    torch.set_num_threads(threads)
    load0 = os.getloadavg()[0]
    cmd = "python benchmarks/interests.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    if args.loss_only:
        doc = json.loads(args.out.with_suffix(".json").read_text())
        torch.set_num_threads(doc["threads"])
        loss = loss_timing([r["interests"] for r in doc["loss"]], args.repeats)
        doc.update(loss=loss, encoder=encoder_timing(args.repeats), loss_repeats=args.repeats, loss_command=cmd, loss_load=[load0, os.getloadavg()[0]],
                   loss_when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        args.out.with_suffix(".json").write_text(json.dumps(doc))
        args.out.write_text(render(doc))
        print(render(doc))
        return 0
    spec = bench_data.ensure(args.dataset)
    data = load_data(spec)
    split = split_leave_last_out(data)
    ev = build_eval_set(data, split, "test")
    kinds, share = target_truth(args.dataset, ev)
    hits: dict[str, np.ndarray] = {}
    train_s: dict[str, float] = {}
    B = fit_ease(split.train, ev.item_ids, lam=DEFAULT_EASE_LAMBDA, dtype=ease_dtype(ev.n_items))
    hits["EASE"] = evaluate_scores(ease_scorer(B, ev), ev, ks=(50,), mask_seen="masked",
                                   per_user=True)["per_user"]["masked"]["HR@50"]
    del B
    for col, scorer in (("ceiling", ceiling_scorer(args.dataset, ev)), ("transitions", transitions_scorer(ev))):
        hits[col] = evaluate_scores(scorer, ev, ks=(50,), mask_seen="masked", per_user=True)["per_user"]["masked"]["HR@50"]
    with tempfile.TemporaryDirectory(prefix="interests-") as tmp:
        for k in ks:
            col = f"{k} interest{'s' if k > 1 else ''}"
            h, secs = train_and_score(spec, data, ev, k, Path(tmp))
            hits[col], train_s[col] = h, secs
            print(f"{col}: test HR@50 {np.mean(h):.4f} in {secs:.1f}s", flush=True)
    loss = loss_timing(ks if 1 in ks else [1, *ks], args.repeats)
    doc = {"dataset": args.dataset, "interests": ks, "users": int(ev.n_users), "groups": groups(hits, kinds, share),
           "train_s": train_s, "loss": loss, "encoder": encoder_timing(args.repeats), "loss_repeats": args.repeats,
           "threads": threads, "command": cmd, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load": [load0, os.getloadavg()[0]]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc))
    args.out.write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
