"""Assemble BENCHMARKS.md from the per-area result files each benchmark script writes.

    python benchmarks/assemble.py      # after quality.py, index.py and serve.py have run

Each section below is the verbatim output of one script run, with its command and machine line;
this file only puts them under one roof, in a fixed order.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
SECTIONS = [
    ("quality-interests.md", "python benchmarks/quality.py --skip-rechub --only 'popularity,ease,ours,one interest,"
                             "youtubednn-mean,hidden layer 256,temperature 0.05,dim 128,dssm,item init transitions,neighbours off' --store "
                             "benchmarks/results/quality-interests.json --out benchmarks/results/quality-interests.md "
                             "--title 'Retrieval quality: multi-interest defaults (3 interests) beside one interest and "
                             "EASE, in one run'"),
    ("http_quality.md", "python benchmarks/http_quality.py"),
    ("interests.md", "python benchmarks/interests.py"),
    ("quality.md", "python benchmarks/quality.py"),
    ("quality-tuned.md", "python benchmarks/quality.py --only ease,ours,tuned --store benchmarks/results/quality-tuned.json "
                         "--out benchmarks/results/quality-tuned.md --title 'Retrieval quality: the 10-minute twotower tune beside the defaults and EASE, in one run'"),
    ("index.md", "python benchmarks/index.py --n 1000000 --dim 64"),
    ("serve.md", "python benchmarks/serve.py"),
    ("replicas.md", "python benchmarks/replicas.py"),
    ("redis_client.md", "python benchmarks/redis_client.py (at commit 8b43a64, before service/resp.py was removed)"),
    ("scale.md", "python benchmarks/scale.py"),
    ("gpu.md", "python benchmarks/gpu.py (on a machine with a CUDA GPU; the reference machine has none)"),
]

HEADER = """# Benchmarks

Every figure here comes from a run of the scripts in `benchmarks/` on the project's reference machine
(2 x86-64 cores, 24 GiB, no GPU). Each section names the command that produced it. Comparisons are
made side by side in one run and reported as ratios; absolute times on a shared 2-core machine move
with whatever else runs, so each section also records the load at the time.

Regenerate: run the scripts, then `python benchmarks/assemble.py`.
"""


def main() -> None:
    parts = [HEADER]
    for name, command in SECTIONS:
        path = ROOT / "results" / name
        if path.exists():
            parts.append(path.read_text().strip())
        else:
            parts.append(f"## {name[:-3]}\n\nNot run yet: `{command}`.")
    (ROOT.parent / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {ROOT.parent / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
