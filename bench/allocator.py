"""`fapm prune` with and without the allocator settings (worker/allocator.py), interleaved.

    .venv/bin/python bench/allocator.py --pair bench/out/pair-1L [--methods dare,breadcrumbs,nps,fapm] [--repeat 2]

Each run is one `fapm prune` under bench/measure.py (wall, user and system CPU, peak RSS); the
"glibc defaults" leg replaces tune_allocator by a no-op before the CLI runs. The digest cache is
off so both legs hash the same bytes. Prints one markdown row per run and checks that both legs
wrote the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NPS_WEIGHTS = "1,2,0.5,1.5,0,2.5,1,0.7"
DEFAULTS = (
    "import sys, worker.allocator as a; a.tune_allocator = lambda: False; "
    "from worker.cli import main; sys.exit(main(sys.argv[1:]))"
)
TUNED = "import sys; from worker.cli import main; sys.exit(main(sys.argv[1:]))"


def _run(leg: str, method: str, pair: Path, out: Path) -> dict:
    args = ["prune", "--base", str(pair / "base"), "--finetuned", str(pair / "finetuned")]
    args += ["--out", str(out), "--method", method, "--sparsity", "0.9", "--overwrite"]
    if method == "nps":
        args += ["--nps-weights", NPS_WEIGHTS]
    code = DEFAULTS if leg == "glibc defaults" else TUNED
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, "-c", code, *args]
        subprocess.run(
            [sys.executable, "-S", str(HERE / "measure.py"), result.name, "--", *command],
            check=True, env={**os.environ, "FAPM_DIGEST_CACHE": "off"}, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        return json.loads(Path(result.name).read_text())


def _digest(out: Path) -> str:
    sha = hashlib.sha256()
    for shard in sorted(out.glob("*.safetensors")):
        sha.update(shard.read_bytes())
    return sha.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, required=True, help="bench/make_pair.py output")
    parser.add_argument("--methods", default="dare,breadcrumbs,nps,fapm")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    print("| method | allocator | wall s | user s | sys s | peak RSS GB | output sha256 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for method in args.methods.split(","):
        for _ in range(args.repeat):
            for leg in ("glibc defaults", "tuned"):
                out = args.work / f"bench-allocator-{method}-{leg.split()[0]}"
                r = _run(leg, method, args.pair, out)
                print(
                    f"| {method} | {leg} | {r['wall_s']:.1f} | {r['user_s']:.1f} | "
                    f"{r['sys_s']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | {_digest(out)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
