"""`fapm` with the input digests started before the engine (and torch) is imported.

    .venv/bin/python bench/fapm_early.py prune --base B --finetuned F --out O ...

The same program as `fapm` (worker.cli.main, same arguments), except that for `prune` it first
calls worker.io.checkpoint.start_early_digests on the local --base and --finetuned, so their
sha256 runs on a second core while `import torch` holds the first (about 1.5-2 s here). This
is the call proposed for worker/cli.py `_prune` (bench/RESULTS.md, issue 13 item 5); leg (b+)
of bench_prune.py runs it to measure what the change is worth before it lands there.
"""

from __future__ import annotations

import sys

from worker.cli import build_parser, main
from worker.io.checkpoint import start_early_digests

if __name__ == "__main__":
    namespace = build_parser().parse_args(sys.argv[1:])
    if getattr(namespace, "base", None) and getattr(namespace, "finetuned", None):
        start_early_digests([namespace.base, namespace.finetuned])
    sys.exit(main())
