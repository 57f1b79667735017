"""Peak memory of `fapm prune` on the torch path with a large vocabulary (issue 13 item 6).

    .venv/bin/python bench/bench_chunked_memory.py --before 8fdc93c          # before and after
    .venv/bin/python bench/bench_chunked_memory.py --rows dare,magnitude-row  # some rows only

On a Llama-3-shaped bf16 pair with a 128,256-token vocabulary (bench/make_pair.py, --gb 2.2: the
embedding and lm_head are 1.05 GB each; into bench/out/pair-2.2gb-vocab128256, as bench_prune.py
--vocab makes it), one `fapm prune` per row, each a method the fused kernel does not take: dare,
breadcrumbs, nps with given band weights, magnitude in scope row and in scope model (sparsity 0.9,
1 GB shards). Each runs under bench/measure.py (wall, CPU, peak RSS from ru_maxrss, the sampled
peaks of RssAnon and RssFile), with the working tree's worker/ (or --commit's) and, with --before,
worker/ as of that revision (bench_prune.py's extraction), the two legs of a row one after the
other. Inputs are read into the page cache before each run. A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_prune import FAPM, OUT, extract_source, run_measured, warm_inputs  # noqa: E402
from make_pair import make_pair  # noqa: E402

# Given weights, one per default band at sparsity 0.9 (nps publishes them, no search).
NPS_WEIGHTS = "1.0,2.0,0.5,1.5,0.0,2.5,1.0,0.7"
ROWS = {
    "dare": ["--method", "dare"],
    "breadcrumbs": ["--method", "breadcrumbs"],
    "nps": ["--method", "nps", "--nps-weights", NPS_WEIGHTS],
    "magnitude-row": ["--method", "magnitude", "--scope", "row"],
    "magnitude-model": ["--method", "magnitude", "--scope", "model"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.2, help="GB per model (2.2)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary (128256)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--before", help="also run each row with worker/ at this revision")
    parser.add_argument("--commit", help="worker/ at this revision instead of the working tree")
    parser.add_argument("--work", type=Path, default=OUT / "work-chunked", help="outputs")
    args = parser.parse_args(argv)

    pair = OUT / f"pair-{args.gb:g}gb-vocab{args.vocab}"
    make_pair(pair, args.gb, vocab=args.vocab)
    legs = [("after", {} if not args.commit else _pythonpath(args.commit))]
    if args.before:
        legs.insert(0, ("before", _pythonpath(args.before)))
    lines = [
        "| row | worker/ | wall s | CPU s | peak RSS GB | peak RssAnon GB | peak RssFile GB | exit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    args.work.mkdir(parents=True, exist_ok=True)
    for row in args.rows.split(","):
        for leg, env in legs:
            out = args.work / f"{row}-{leg}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            warm_inputs(pair / "base", pair / "finetuned")
            command = [str(FAPM), "prune", "--base", str(pair / "base"), "--finetuned"]
            command += [str(pair / "finetuned"), "--out", str(out), "--sparsity", "0.9"]
            command += ["--shard-size", "1GB", "--overwrite", *ROWS[row]]
            m = run_measured(command, args.work / f"{row}-{leg}.log", env)
            where = env.get("PYTHONPATH", "working tree").rsplit("/", 1)[-1]
            line = (
                f"| {row} | {leg} ({where}) | {m['wall_s']:.1f} | {m['user_s'] + m['sys_s']:.1f} "
                f"| {m['peak_rss_bytes'] / 1e9:.2f} | {m.get('peak_rss_anon_bytes', 0) / 1e9:.2f} "
                f"| {m.get('peak_rss_file_bytes', 0) / 1e9:.2f} | {m['exit']} |"
            )
            print(line, file=sys.stderr, flush=True)
            lines.append(line)
            shutil.rmtree(out, ignore_errors=True)
    print("\n".join(lines))
    return 0


def _pythonpath(rev: str) -> dict[str, str]:
    _, target = extract_source(rev)
    return {"PYTHONPATH": str(target)}


if __name__ == "__main__":
    sys.exit(main())
