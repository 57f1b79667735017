"""Benchmark `fapm prune` against a copy-through and mergekit `ties` on a synthetic Llama-8B-shaped pair.

    .venv/bin/python bench/bench_prune.py --sizes 2,4            # the full run (about 15 minutes)
    .venv/bin/python bench/bench_prune.py --sizes 2 --skip-mergekit
    .venv/bin/python bench/bench_prune.py --sizes 2.2 --vocab 128256 --skip-mergekit  # Llama-3 vocab

For each size (decimal GB per model) it makes the pair if needed (bench/make_pair.py, into
bench/out/pair-<N>gb) and times, each as its own subprocess:

  (a)  copy-through: bench/copy_through.py reads every tensor of both checkpoints with safetensors
       and writes the fine-tuned tensors as a new checkpoint of 1 GB shards, fsyncing each shard
  (a') the same copy-through with fapm's write path (--engine-io: shards preallocated, each
       tensor's writeback started at once): how much of (b)'s standing against (a) is I/O
  (b)  `fapm prune --sparsity 0.9 --shard-size 1GB` (FAPM, --kernel auto: the fused numba kernel
       when worker/engine/kernels/cpu_fused.py is there)
  (b+) the same through bench/fapm_early.py: the input digests start before `import torch`
       (the worker/cli.py change proposed in bench/RESULTS.md); when the kernel is there, also
  (b') the same with --kernel torch (the reference torch path), at the first size only unless
       --torch-sizes says otherwise (it runs at ~2 min per GB)
  (c)  mergekit 0.1.5 `ties`, density 0.1, weight 1.0, normalize false, dtype bfloat16, in
       bench/.mergekit-venv (bench/setup_mergekit.sh), `--out-shard-size 1B` (1e9 bytes of tensor
       data per shard, as the other two), `--lazy-unpickle`, `--no-copy-tokenizer`; the timed window
       includes fsyncing its output shards afterwards, because (a) and (b) fsync theirs

Fairness: before each leg the previous outputs are removed and `sync` runs (outside the timed
window), and both input checkpoints are read through once so every leg starts with its
inputs in the page cache (24 GB of RAM holds them). Legs (a) and (b) are run once untimed on a
small pair first, so numba's on-disk JIT cache is filled (compiling is not what is measured; a fapm
leg that compiled anyway, because the kernel source changed meanwhile, says so in its note).

Legs (a), (a'), (b) and (b+) run --repeat times (3), interleaved (a, a', b, b+, a, a', ...: the
ratios come from one stretch of a shared machine), and report the median wall and CPU and the
largest peak RSS; a run during which other processes kept more than 0.3 of a core busy, or that
JIT-compiled, is discarded and run again in a later round (at most 2 x --repeat times). The slow
legs (b') and (c) run once, after them.

Per leg: wall time, input GB/s = (base + fine-tuned safetensors bytes) / wall, peak RSS (ru_maxrss of
the child from os.wait4, taken in bench/measure.py), the peaks of its RssAnon and RssFile (sampled
every 10 ms) and CPU seconds (user + sys of the child). The
markdown table goes to stdout and, with --markdown FILE, to a file; raw numbers to
bench/out/bench-results.json.
Other processes on the machine skew wall times (a shared 2-core box): before each leg the script
waits (up to --quiet-wait s) for the others to go idle, and it records how many cores the rest of
the machine kept busy during the leg ("others' load", from /proc/stat minus the leg's own CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
PROJECT_PY = REPO / ".venv" / "bin" / "python"
MERGEKIT_VENV = BENCH / ".mergekit-venv"
MERGEKIT_YAML = MERGEKIT_VENV / "bin" / "mergekit-yaml"

sys.path.insert(0, str(BENCH))
from make_pair import VOCAB, make_pair  # noqa: E402

# Offline: nothing may try the hub (mergekit/transformers look for tokenizers and configs).
# NUMBA_DEBUG_CACHE makes numba log cache loads/saves: a save in a timed fapm leg means it compiled.
# FAPM_DIGEST_CACHE=off: every fapm run hashes its inputs, as a job on a pair new to the machine
# does (the repeats would otherwise take the digests from the cache of the first run).
CHILD_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "NUMBA_DEBUG_CACHE": "1",
    "FAPM_DIGEST_CACHE": "off",
}
KERNEL = Path("worker") / "engine" / "kernels" / "cpu_fused.py"


def kernel_source() -> Path:
    return Path(CHILD_ENV.get("PYTHONPATH") or REPO) / KERNEL


@dataclass
class Leg:
    size: str
    leg: str
    label: str
    command: list[str]
    wall_s: float = 0.0
    input_gb_s: float = 0.0
    peak_rss_gb: float = 0.0
    peak_anon_gb: float = 0.0  # RssAnon, sampled (bench/measure.py)
    peak_file_gb: float = 0.0  # RssFile: mapped pages of inputs and outputs
    cpu_s: float = 0.0
    others_cores: float = 0.0
    note: str = ""
    ok: bool = True
    runs: list[dict] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # over CHILD_ENV, for this leg only


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def warm_inputs(*directories: Path) -> float:
    """Read the inputs once so they are in the page cache; returns the seconds it took."""
    started = time.perf_counter()
    for directory in directories:
        for path in sorted(directory.glob("*.safetensors")):
            with open(path, "rb") as f:
                while f.readinto(_BUFFER):
                    pass
    return time.perf_counter() - started


_BUFFER = bytearray(64 * 2**20)


def drop_inputs(*directories: Path) -> None:
    """Evict the inputs from the page cache (--cold-inputs): the run reads them from the disk.
    POSIX_FADV_DONTNEED needs no root, unlike /proc/sys/vm/drop_caches; the pages are clean
    (written long before, and `sync` ran), so the kernel can drop every one."""
    for directory in directories:
        for path in sorted(directory.glob("*.safetensors")):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --cold-inputs: each run starts with its inputs evicted from the page cache instead of read in.
COLD_INPUTS = False
BEFORE: tuple[str, Path] | None = None  # --before: (sha, extracted worker/) for leg (b0)


def run_measured(command: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run `command` under bench/measure.py; its exit code, wall s, peak RSS bytes, user/sys s."""
    result = log.with_suffix(".json")
    with open(log, "wb") as sink:
        subprocess.run(
            [sys.executable, "-S", str(BENCH / "measure.py"), str(result), "--", *command],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**CHILD_ENV, **(env or {})},
            cwd=REPO,
            check=True,
        )
    return json.loads(result.read_text())


def cpu_busy_s() -> float:
    """CPU seconds spent busy on the whole machine since boot (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most max_wait s) until other processes use under `threshold` of a core; returns it."""
    deadline = time.monotonic() + max_wait
    while True:
        before = cpu_busy_s()
        time.sleep(1.0)
        busy = cpu_busy_s() - before
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def snapshot_source(rev: str) -> Path:
    """Extract worker/ at git revision `rev` into bench/out/src-<sha>/ and make the children import
    it (PYTHONPATH comes before the editable install), so edits to the working tree during a run
    cannot change what is measured. Returns the directory."""
    sha, target = extract_source(rev)
    CHILD_ENV["PYTHONPATH"] = str(target)
    CHILD_ENV["FAPM_BENCH_COMMIT"] = sha
    probe = "import worker, sys; print(worker.__file__)"
    where = subprocess.run(
        [str(PROJECT_PY), "-c", probe],
        cwd=target,
        env=CHILD_ENV,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not where.startswith(str(target)):
        raise SystemExit(f"the snapshot of {rev} is not what gets imported ({where})")
    return target


def extract_source(rev: str) -> tuple[str, Path]:
    """worker/ at git revision `rev`, extracted into bench/out/src-<sha>/ (once): (sha, folder)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    target = OUT / f"src-{sha[:12]}"
    if not (target / "worker" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", sha, "worker"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return sha, target


def fused_kernel_present() -> bool:
    probe = (
        "import sys\n"
        "try:\n"
        "    from worker.engine.kernels import cpu_fused\n"
        "except ImportError:\n"
        "    sys.exit(1)\n"
        "sys.exit(0 if cpu_fused.fused_available() else 1)\n"
    )
    # cwd is not the repository: `python -c` would import the working tree's worker/ from there.
    return subprocess.run([str(PROJECT_PY), "-c", probe], cwd=OUT, env=CHILD_ENV).returncode == 0


def source_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def mergekit_config(base: Path, finetuned: Path, path: Path) -> Path:
    path.write_text(
        "merge_method: ties\n"
        f"base_model: {base}\n"
        "models:\n"
        f"  - model: {finetuned}\n"
        "    parameters:\n"
        "      weight: 1.0\n"
        "      density: 0.1\n"
        "parameters:\n"
        "  normalize: false\n"
        "dtype: bfloat16\n"
    )
    return path


FAPM = REPO / ".venv" / "bin" / "fapm"


def fapm_command(base: Path, ft: Path, out: Path, kernel: str) -> list[str]:
    return [
        *(str(FAPM), "prune", "--base", str(base), "--finetuned", str(ft), "--out", str(out)),
        *("--sparsity", "0.9", "--shard-size", "1GB", "--overwrite", "--kernel", kernel),
    ]


def legs_for(
    size: str,
    pair: Path,
    with_torch: bool,
    with_mergekit: bool,
    work: Path,
    before: tuple[str, Path] | None = None,
) -> list[Leg]:
    base, ft = pair / "base", pair / "finetuned"
    copy = [str(PROJECT_PY), str(BENCH / "copy_through.py"), "--base", str(base)]
    copy += ["--finetuned", str(ft), "--out", str(work / "copy"), "--shard-size", "1e9"]
    legs = [
        Leg(size, "a", "copy-through (safetensors read both, write fine-tuned, fsync)", copy),
        Leg(
            size,
            "a'",
            "copy-through with fapm's write path (preallocate, early writeback)",
            [*copy, "--engine-io"],
        ),
        *(
            [
                Leg(
                    size,
                    "b0",
                    f"(b) with worker/ at {before[0][:7]} (before)",
                    fapm_command(base, ft, work / "fapm", "auto"),
                    env={"PYTHONPATH": str(before[1])},
                )
            ]
            if before is not None
            else []
        ),
        Leg(
            size,
            "b",
            "fapm prune, FAPM 0.9, --kernel auto",
            fapm_command(base, ft, work / "fapm", "auto"),
        ),
    ]
    early = [
        str(PROJECT_PY),
        str(BENCH / "fapm_early.py"),
        *fapm_command(base, ft, work / "fapm", "auto")[1:],
    ]
    legs.append(
        Leg(
            size,
            "b+",
            "(b) with the input digests started before `import torch` (bench/fapm_early.py)",
            early,
        )
    )
    if with_torch:
        legs.append(
            Leg(
                size,
                "b'",
                "fapm prune, FAPM 0.9, --kernel torch",
                fapm_command(base, ft, work / "fapm-torch", "torch"),
            )
        )
    if with_mergekit:
        config = mergekit_config(base, ft, work / "ties.yml")
        mergekit = [str(MERGEKIT_YAML), str(config), str(work / "mergekit")]
        mergekit += ["--out-shard-size", "1B", "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"]
        legs.append(
            Leg(size, "c", "mergekit 0.1.5 ties, density 0.1 (+ fsync of its shards)", mergekit)
        )
    return legs


def output_of(leg: Leg) -> Path:
    if leg.leg == "c":
        return Path(leg.command[2])
    return Path(leg.command[leg.command.index("--out") + 1])


# A fast leg's run during which other processes kept more than this many cores busy is repeated.
NOISY_CORES = 0.3


def run_once(leg: Leg, pair: Path, log: Path, quiet_wait: float) -> dict:
    out = output_of(leg)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    wait_for_quiet(quiet_wait)
    (drop_inputs if COLD_INPUTS else warm_inputs)(pair / "base", pair / "finetuned")
    busy_start = cpu_busy_s()
    measured = run_measured(leg.command, log, leg.env)
    if measured["exit"] == 0 and leg.leg == "c":
        started = time.perf_counter()
        fsync_tree(out)
        measured["wall_s"] += time.perf_counter() - started
    measured["cpu_s"] = measured["user_s"] + measured["sys_s"]
    # CPU the rest of the machine used meanwhile, in cores (2 = both cores taken by others).
    others = cpu_busy_s() - busy_start - measured["cpu_s"]
    measured["others_cores"] = max(0.0, others) / measured["wall_s"]
    measured["note"] = ""
    if measured["exit"] == 0 and leg.leg.startswith("b"):
        report = json.loads((out / "pruning_report.json").read_text())
        measured["note"] = f"implementation {report['implementation']}"
        compiled = log.read_text(errors="replace").count("[cache] data saved")
        if compiled:
            measured["note"] += f"; numba compiled {compiled} functions (stale JIT cache)"
    if measured["exit"] == 0:
        shutil.rmtree(out, ignore_errors=True)  # keep the disk for the next leg
    return measured


FAST_LEGS = ("a", "a'", "b0", "b", "b+")


def run_legs(
    legs: list[Leg],
    pair: Path,
    log_dir: Path,
    quiet_wait: float,
    repeats: int,
    max_discards: int | None = None,
) -> None:
    """Run the fast legs in rounds, one run of each per round (a, a', b, b+, a, a', ...), so
    every leg sees the same stretch of a shared machine and the ratios between them come from
    one run of the bench; then the slow legs once each. A fast leg's run during which others
    kept the machine busy (or that compiled) is run again in a later round, `max_discards`
    times at most (default twice per repeat)."""
    max_discards = 2 * repeats if max_discards is None else max_discards
    fast = [leg for leg in legs if leg.leg in FAST_LEGS]
    runs: dict[int, list[dict]] = {id(leg): [] for leg in legs}
    discarded: dict[int, int] = {id(leg): 0 for leg in legs}
    attempts = 0
    while True:
        todo = [
            leg
            for leg in fast
            if leg.ok and len(runs[id(leg)]) < repeats  # once its discards are used, a run is kept
        ]
        if not todo:
            break
        for leg in todo:
            run = _attempt(leg, pair, log_dir, quiet_wait, attempts)
            attempts += 1
            if run["exit"] != 0:
                runs[id(leg)].append(run)
                leg.ok = False
                continue
            noisy = run["others_cores"] > NOISY_CORES or "numba compiled" in run["note"]
            if repeats > 1 and noisy and discarded[id(leg)] < max_discards:
                discarded[id(leg)] += 1
                continue
            runs[id(leg)].append(run)
    for leg in legs:
        if leg.leg not in FAST_LEGS:
            runs[id(leg)].append(_attempt(leg, pair, log_dir, quiet_wait, attempts))
            attempts += 1
        _summarize(leg, runs[id(leg)], discarded[id(leg)], pair)


def _attempt(leg: Leg, pair: Path, log_dir: Path, quiet_wait: float, attempt: int) -> dict:
    log = log_dir / f"{leg.size}-{leg.leg.replace(chr(39), 'p').replace('+', 'plus')}-{attempt}.log"
    run = run_once(leg, pair, log, quiet_wait)
    if run["exit"] != 0:
        leg.note = f"exit {run['exit']}; see {log}"
    print(
        f"    ({leg.leg}) run: {run['wall_s']:.2f}s CPU {run.get('cpu_s', 0):.1f}s "
        f"others {run.get('others_cores', 0):.2f} cores",
        file=sys.stderr,
        flush=True,
    )
    return run


def _summarize(leg: Leg, runs: list[dict], discarded: int, pair: Path) -> None:
    """Wall and CPU are the medians of the runs kept, peak RSS the largest."""
    leg.runs = runs
    good = [r for r in runs if r["exit"] == 0] or runs
    leg.wall_s = statistics.median(r["wall_s"] for r in good)
    leg.cpu_s = statistics.median(r["cpu_s"] for r in good)
    leg.peak_rss_gb = max(r["peak_rss_bytes"] for r in good) / 1e9
    leg.peak_anon_gb = max(r.get("peak_rss_anon_bytes", 0) for r in good) / 1e9
    leg.peak_file_gb = max(r.get("peak_rss_file_bytes", 0) for r in good) / 1e9
    leg.others_cores = max(r["others_cores"] for r in good)
    input_bytes = weights_bytes(pair / "base") + weights_bytes(pair / "finetuned")
    leg.input_gb_s = input_bytes / 1e9 / leg.wall_s
    if leg.ok:
        parts = {part for r in good for part in r["note"].split("; ") if part}
        leg.note = "; ".join(sorted(parts))
    walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
    if len(runs) > 1:
        leg.note = f"runs {walls} s" + (f"; {leg.note}" if leg.note else "")
    if discarded:
        leg.note += f"; {discarded} run(s) discarded as noisy"
    print(
        f"  ({leg.leg}) {leg.wall_s:7.1f}s  {leg.input_gb_s:5.2f} GB/s  "
        f"RSS {leg.peak_rss_gb:5.2f} GB (anon {leg.peak_anon_gb:.2f})  CPU {leg.cpu_s:6.1f}s  "
        f"others {leg.others_cores:.2f} cores  {leg.note}",
        file=sys.stderr,
        flush=True,
    )


def markdown(results: list[Leg], sizes: dict[str, dict]) -> str:
    lines = [
        "| size/model | leg | run | wall s | input GB/s | peak RSS GB | peak RssAnon GB "
        "| peak RssFile GB | CPU s | others' cores | vs (a) | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for leg in results:
        a = next((x for x in results if x.size == leg.size and x.leg == "a" and x.ok), None)
        ratio = f"{leg.wall_s / a.wall_s:.2f}x" if a and leg.ok else "-"
        gb = sizes[leg.size]["bytes_per_model"] / 1e9
        lines.append(
            f"| {gb:.2f} GB | ({leg.leg}) | {leg.label} | {leg.wall_s:.1f} | {leg.input_gb_s:.2f} | "
            f"{leg.peak_rss_gb:.2f} | {leg.peak_anon_gb:.2f} | {leg.peak_file_gb:.2f} | {leg.cpu_s:.1f} | {leg.others_cores:.2f} | {ratio} | {leg.note} |"
        )
    lines += ["", "| size/model | target | measured | met |", "| --- | --- | --- | --- |"]
    for size in sizes:
        got = {x.leg: x for x in results if x.size == size and x.ok}
        gb = f"{sizes[size]['bytes_per_model'] / 1e9:.2f} GB"
        if "a" in got and "b" in got:
            r = got["b"].wall_s / got["a"].wall_s
            lines.append(
                f"| {gb} | (b)/(a) wall <= 1.5 | {r:.2f} | {'yes' if r <= 1.5 else 'no'} |"
            )
        if "b" in got and "c" in got:
            r = got["c"].wall_s / got["b"].wall_s
            lines.append(f"| {gb} | (c)/(b) wall >= 3 | {r:.2f} | {'yes' if r >= 3 else 'no'} |")
        if "b" in got:
            m = got["b"].peak_rss_gb
            lines.append(
                f"| {gb} | (b) peak RSS < 1.5 GB | {m:.2f} GB | {'yes' if m < 1.5 else 'no'} |"
            )
        if "a'" in got and "b" in got:
            r = got["b"].wall_s / got["a'"].wall_s
            lines.append(f"| {gb} | (b)/(a'), for reference: against the same I/O | {r:.2f} | - |")
        if "b+" in got and "a" in got:
            r = got["b+"].wall_s / got["a"].wall_s
            lines.append(
                f"| {gb} | (b+)/(a): digests started before torch is imported | {r:.2f} | - |"
            )
        if "b'" in got and "a" in got:
            r = got["b'"].wall_s / got["a"].wall_s
            lines.append(f"| {gb} | (b') torch path, for reference: (b')/(a) | {r:.2f} | - |")
    return "\n".join(lines) + "\n"


def warm_up() -> None:
    """Run (a) and (b) once on a small pair so numba's JIT cache is on disk (untimed)."""
    pair = OUT / "pair-warmup"
    make_pair(pair, 0.0, layers=1, vocab=1024)
    work = OUT / "work-warmup"
    work.mkdir(parents=True, exist_ok=True)
    for leg in legs_for("warmup", pair, False, False, work, BEFORE):
        if leg.leg in ("a'", "b+"):  # a' needs worker/ from 16ed349 on; b+ is (b) again
            continue
        env = {**CHILD_ENV, **leg.env}
        code = subprocess.run(leg.command, cwd=REPO, env=env, capture_output=True).returncode
        if code != 0:
            raise SystemExit(f"warm-up of ({leg.leg}) failed: {' '.join(leg.command)}")
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2,4", help="GB per model, comma-separated (2,4)")
    parser.add_argument("--skip-mergekit", action="store_true", help="leave out leg (c)")
    parser.add_argument(
        "--torch-sizes",
        help="sizes at which leg (b') (--kernel torch, ~2 min/GB) also runs; default: the first "
        "of --sizes only, to keep a full run under 20 minutes; 'none' leaves it out",
    )
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of the fast legs (a) and (b); the table gives the median wall (3)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each leg, wait up to this many seconds for other processes to go idle (60)",
    )
    parser.add_argument(
        "--commit",
        help="measure worker/ as of this git revision (e.g. HEAD), extracted into bench/out/, "
        "instead of the working tree (which others may be editing)",
    )
    parser.add_argument(
        "--vocab",
        type=int,
        default=VOCAB,
        help=f"vocabulary of the pairs ({VOCAB}); e.g. 128256 for Llama-3 shapes, whose "
        "embedding and lm_head are 1.05 GB each (pairs go to bench/out/pair-<N>gb-vocab<V>)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="where the legs write their outputs (bench/out/work-<N>gb); e.g. a tmpfs such as "
        "/dev/shm/fapm-bench for a disk whose writes and fsync cost nothing",
    )
    parser.add_argument(
        "--cold-inputs",
        action="store_true",
        help="evict the inputs from the page cache before each run (they are read in otherwise)",
    )
    parser.add_argument(
        "--before",
        help="also run (b) with worker/ as of this git revision (leg b0), interleaved with the "
        "others, so a change's before and after come from the same stretch of the machine",
    )
    parser.add_argument(
        "--max-discards",
        type=int,
        help="noisy runs a fast leg may discard before it keeps one anyway (2 x --repeat)",
    )
    args = parser.parse_args(argv)
    global COLD_INPUTS, BEFORE
    COLD_INPUTS = args.cold_inputs
    BEFORE = extract_source(args.before) if args.before else None

    with_mergekit = not args.skip_mergekit
    if with_mergekit and not MERGEKIT_YAML.exists():
        print(
            f"{MERGEKIT_YAML} is missing: run bench/setup_mergekit.sh (or --skip-mergekit)",
            file=sys.stderr,
        )
        return 2
    if args.commit:
        source = snapshot_source(args.commit)
        print(f"worker/ from {CHILD_ENV['FAPM_BENCH_COMMIT'][:12]} ({source})", file=sys.stderr)
    fused = fused_kernel_present()
    sizes_list = [x.strip() for x in args.sizes.split(",") if x.strip()]
    torch_sizes = (args.torch_sizes or sizes_list[0]).split(",")
    torch_sizes = [] if torch_sizes == ["none"] else [x.strip() for x in torch_sizes]
    print(f"fused numba kernel present: {fused}", file=sys.stderr)
    OUT.mkdir(exist_ok=True)
    kernel_digest = source_digest(kernel_source())
    started = time.perf_counter()
    warm_up()

    results: list[Leg] = []
    sizes: dict[str, dict] = {}
    log_dir = OUT / "logs"
    log_dir.mkdir(exist_ok=True)
    for size in sizes_list:
        with_torch = fused and size in torch_sizes
        vocab_tag = "" if args.vocab == VOCAB else f"-vocab{args.vocab}"
        pair = OUT / f"pair-{float(size):g}gb{vocab_tag}"
        sizes[size] = make_pair(pair, float(size), vocab=args.vocab)
        work = (args.work or OUT) / f"work-{float(size):g}gb"
        work.mkdir(parents=True, exist_ok=True)
        print(f"{size} GB/model ({sizes[size]['bytes_per_model'] / 1e9:.2f} GB):", file=sys.stderr)
        legs = legs_for(size, pair, with_torch, with_mergekit, work, BEFORE)
        run_legs(legs, pair, log_dir, args.quiet_wait, args.repeat, args.max_discards)
        results.extend(legs)
    table = markdown(results, sizes)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    (OUT / "bench-results.json").write_text(
        json.dumps(
            {
                "sizes": sizes,
                "legs": [asdict(x) for x in results],
                "fused_kernel": fused,
                "worker_commit": CHILD_ENV.get("FAPM_BENCH_COMMIT", "working tree"),
                "kernel_source_sha256": kernel_digest,
                "kernel_source_sha256_at_end": source_digest(kernel_source()),
                "cpus": os.cpu_count(),
                "seconds": time.perf_counter() - started,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"total {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0 if all(x.ok for x in results) else 1


if __name__ == "__main__":
    sys.exit(main())
