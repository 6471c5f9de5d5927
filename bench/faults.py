"""Fault-injection campaign: SIGKILL a 2-rank training run again and again, restart it each
time, and check that nothing is lost.

    python bench/faults.py [--kills 20] [--seed 0] [--steps N] [--out DIR] [--no-doc]
                           [--no-rank-kill] [--no-disk-full]

The run is the smoke model on two data-parallel ranks (self-launched through torchrun) with a
checkpoint every step, `keep_last=2`, and sync or async saves chosen per restart. Each kill
takes the whole process tree (torchrun and both ranks: its process group) at a moment drawn
from a seeded generator, of one of four kinds:

- `random`: any time after the start, setup included;
- `step`: a few training steps into the restart;
- `commit`: inside the commit window (every shard written, the checkpoint not yet published;
  `NEMOTRON_TRAIN_SAVE_COMMIT_DELAY_S` holds the window open);
- `prune`: while an old checkpoint is being deleted (`NEMOTRON_TRAIN_PRUNE_DELAY_S`).

Checked throughout: whenever the tracker exists it names a complete checkpoint (polled while
the run is alive), after every kill it names a readable one, and the tracked step never goes
back. At the end the run completes and its per-step losses must equal an uninterrupted run's
bitwise, one record per step. Two more drills: killing one rank only (the job must end
within the collective timeout instead of hanging), and a disk that fills during a save (a
small tmpfs, which needs root: the error names the directory and the space needed, and the
previous checkpoint stays intact). Results replace the `## Fault-injection campaign` section
of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.doc_section import replace_section  # noqa: E402
from nemotron_train.checkpoint import layout  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
SMOKE = str(ROOT / "configs" / "smoke.yaml")
KINDS = ("random", "step", "commit", "prune")
WINDOW_S = "3"  # how long the commit / prune windows are held open in legs that target them
COLLECTIVE_TIMEOUT_MIN = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(out: Path, cache: Path, steps: int, *extra: str) -> List[str]:
    return [
        f"run.output_dir={out}", f"data.cache_dir={cache}", f"train.steps={steps}",
        "train.seq_length=64", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.log_interval=1", "train.eval_interval=0", "train.eval_iters=1",
        "parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=2",
        "checkpoint.interval=1", "checkpoint.keep_last=2", "checkpoint.save_at_end=true",
        "logging.progress_bar=false", f"resilience.collective_timeout_minutes={COLLECTIVE_TIMEOUT_MIN}",
        f"launch.master_port={free_port()}", *extra,
    ]


def env(**extra: str) -> Dict[str, str]:
    e = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    return e


def start(args: List[str], log: Path, **extra_env: str) -> subprocess.Popen:
    """The launcher in a session of its own (torchrun puts each rank in another one)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "nemotron_train", "train", SMOKE, *args], cwd=ROOT,
                                env=env(**extra_env), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _children() -> Dict[int, List[int]]:
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree(pid: int) -> List[int]:
    """`pid` and all its descendants (torchrun, its ranks, their async-save writers)."""
    children, found, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the whole tree at one moment: freeze every process first (SIGSTOP, repeated
    until no new process appears), then kill them all. torchrun starts each rank in a
    session of its own, so killing its process group alone would leave the ranks running."""
    frozen: List[int] = []
    while True:
        new = [p for p in tree(proc.pid) if p not in frozen]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen += new
    for p in frozen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(alive(p) for p in frozen) and time.time() < deadline:
        time.sleep(0.05)
    if any(alive(p) for p in frozen):
        raise RuntimeError(f"processes {[p for p in frozen if alive(p)]} survived SIGKILL")


def metrics(out: Path) -> List[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in records if "loss" in r]


def last_step(out: Path) -> int:
    steps = [r["step"] for r in metrics(out)]
    return max(steps) if steps else 0


@dataclass
class Watch:
    """What the campaign saw: tracked steps over time, and any broken invariant."""

    root: Path
    tracked: List[int] = field(default_factory=list)
    violations: List[str] = field(default_factory=list)

    def poll(self) -> None:
        try:
            step = layout.read_tracker(self.root)
        except Exception as exc:  # a torn tracker would be a violation too
            self.violations.append(f"tracker unreadable: {exc}")
            return
        if step is None:
            return
        if not layout.is_iteration_dir(layout.iter_dir(self.root, step)):
            time.sleep(0.01)  # the tracker may have moved on between the two reads
            if layout.read_tracker(self.root) == step and not layout.is_iteration_dir(layout.iter_dir(self.root, step)):
                self.violations.append(f"the tracker names step {step}, whose checkpoint is missing or incomplete")
        if self.tracked and step < self.tracked[-1]:
            self.violations.append(f"the tracker went back from step {self.tracked[-1]} to {step}")
        if not self.tracked or step != self.tracked[-1]:
            self.tracked.append(step)

    def after_kill(self) -> Optional[int]:
        self.poll()
        step = layout.read_tracker(self.root)
        if step is not None:
            reason = layout.unreadable_reason(layout.iter_dir(self.root, step))
            if reason:
                self.violations.append(f"after a kill the tracker names step {step}, which cannot be read: {reason}")
        return step


def trigger(kind: str, rng: random.Random, out: Path, root: Path, started: float, first: int):
    """A predicate: is this the moment to kill?"""
    if kind == "random":
        at = started + rng.uniform(2.0, 12.0)
        return lambda: time.time() >= at
    if kind == "step":
        k, extra = rng.randint(1, 3), rng.uniform(0.0, 0.4)
        state = {"seen": None}

        def step_reached():
            if state["seen"] is None and last_step(out) >= first + k:
                state["seen"] = time.time()
            return state["seen"] is not None and time.time() >= state["seen"] + extra
        return step_reached
    # Leftovers of the previous kill do not count: only windows this leg opened after setup
    # (which tidies leftovers up) and after its first step.
    def fresh(path: Path) -> bool:
        try:
            return path.stat().st_mtime >= started
        except FileNotFoundError:
            return False

    if kind == "commit":
        return lambda: last_step(out) > first and any(fresh(p / ".metadata") for p in root.glob("iter_*.incomplete"))
    return lambda: last_step(out) > first and any(root.glob("iter_*.pruning"))


def campaign(args, out: Path, cache: Path, reference: List[float]) -> dict:
    rng = random.Random(args.seed)
    run = out / "campaign"
    root = run / "checkpoints"
    watch = Watch(root)
    kills: List[dict] = []
    leg = 0
    while len(kills) < args.kills:
        leg += 1
        kind = rng.choice(args.kinds)
        async_save = rng.random() < 0.5
        extra_env = {}
        if kind == "commit":
            extra_env["NEMOTRON_TRAIN_SAVE_COMMIT_DELAY_S"] = WINDOW_S
        if kind == "prune":
            extra_env["NEMOTRON_TRAIN_PRUNE_DELAY_S"] = WINDOW_S
        first = last_step(run)
        proc = start(overrides(run, cache, args.steps, f"checkpoint.async_save={str(async_save).lower()}"),
                     out / f"leg{leg:02d}.log", **extra_env)
        due = trigger(kind, rng, run, root, time.time(), first)
        while proc.poll() is None and not due():
            watch.poll()
            time.sleep(0.02)
        if proc.poll() is not None:
            raise RuntimeError(f"leg {leg} ({kind}) ended with {proc.returncode} before its kill; see {out / f'leg{leg:02d}.log'}")
        at_step = last_step(run)
        before = len(watch.violations)
        kill_tree(proc)
        tracked = watch.after_kill()
        kills.append({"leg": leg, "kind": kind, "async": async_save, "last_logged_step": at_step, "tracker": tracked,
                      "ok": len(watch.violations) == before})
        print(f"kill {len(kills):2d}/{args.kills}: {kind:6s} {'async' if async_save else 'sync ':5s} "
              f"at step {at_step:3d}, tracker -> {tracked}", flush=True)
    proc = start(overrides(run, cache, args.steps), out / "final.log")
    while proc.poll() is None:
        watch.poll()
        time.sleep(0.05)
    watch.after_kill()
    if proc.returncode != 0:
        raise RuntimeError(f"the final restart failed ({proc.returncode}); see {out / 'final.log'}")
    records = metrics(run)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    return {
        "kills": kills,
        "survived": sum(1 for x in kills if x["ok"]),
        "violations": watch.violations,
        "tracked": watch.tracked,
        "one_record_per_step": steps == list(range(1, args.steps + 1)),
        "identical": losses == reference,
    }


def reference_run(args, out: Path, cache: Path) -> List[float]:
    ref = out / "reference"
    proc = start(overrides(ref, cache, args.steps), out / "reference.log")
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {out / 'reference.log'}")
    return [r["loss"] for r in metrics(ref)]


def rank_pid(launcher: int, local_rank: str) -> Optional[int]:
    """The training process of one local rank under the launcher."""
    for pid in tree(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in environ):
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == launcher or f"LOCAL_RANK={local_rank}".encode() not in Path(f"/proc/{parent}/environ").read_bytes():
                return pid  # the rank itself, not one of its async writers
    return None


def kill_one_rank(args, out: Path, cache: Path) -> dict:
    run = out / "one_rank"
    proc = start(overrides(run, cache, args.steps), out / "one_rank.log")
    deadline = time.time() + 120
    while last_step(run) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim = rank_pid(proc.pid, "1")
    if proc.poll() is not None or victim is None:
        kill_tree(proc)
        raise RuntimeError(f"the one-rank drill could not find rank 1 running; see {out / 'one_rank.log'}")
    # The job: torchrun and the other ranks. The victim's own helpers (megatron-core's writer
    # processes and multiprocessing's resource tracker) are orphaned by a SIGKILL and do not
    # notice; they are counted and cleaned up separately.
    orphans = tree(victim)[1:]
    everyone = [p for p in tree(proc.pid) if p != victim and p not in orphans]
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    limit = COLLECTIVE_TIMEOUT_MIN * 60 + 30
    while any(alive(p) for p in everyone) and time.time() < killed_at + limit:
        time.sleep(0.05)
    ended = not any(alive(p) for p in everyone)
    elapsed = time.time() - killed_at
    if not ended:
        kill_tree(proc)
    proc.wait()
    lingering = [p for p in orphans if alive(p)]
    for p in lingering:
        os.kill(p, signal.SIGKILL)
    step = layout.read_tracker(run / "checkpoints")
    readable = step is not None and layout.unreadable_reason(layout.iter_dir(run / "checkpoints", step)) is None
    return {"ended": ended, "seconds": round(elapsed, 1), "exit_code": proc.returncode, "tracker_readable": readable,
            "limit_s": limit, "orphans": len(lingering)}


def disk_full(args, out: Path, cache: Path, checkpoint_bytes: int) -> dict:
    """A tmpfs one and a half checkpoints big: the step-1 save fits, step 2 cannot."""
    mount = Path(tempfile.mkdtemp(prefix="ckpt-tmpfs-", dir=out))
    size = int(checkpoint_bytes * 1.5)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"skipped": f"cannot mount a tmpfs here ({getattr(exc, 'stderr', b'') or exc}); needs root"}
    try:
        run = out / "disk_full"
        proc = start(overrides(run, cache, 4, f"checkpoint.dir={mount}", "checkpoint.keep_last=1"), out / "disk_full.log")
        code = proc.wait(timeout=300)
        text = (out / "disk_full.log").read_text()
        message = [line for line in text.splitlines() if "not enough disk space" in line]
        step = layout.read_tracker(mount)
        return {
            "exit_code": code,
            "message": message[0].strip().replace(str(mount), "<tmpfs>") if message else None,
            "names_directory": bool(message) and str(mount) in message[0],
            "tracker": step,
            "previous_intact": step == 1 and layout.unreadable_reason(layout.iter_dir(mount, 1)) is None,
            "tmpfs_bytes": size,
        }
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def report(args, result: dict, rank: Optional[dict], disk: Optional[dict], elapsed: float) -> str:
    n = len(result["kills"])
    by_kind = {k: sum(1 for x in result["kills"] if x["kind"] == k) for k in KINDS}
    lines = [
        "## Fault-injection campaign",
        "",
        f"`python bench/faults.py --kills {args.kills} --seed {args.seed} --steps {args.steps}`: the smoke model on "
        "two data-parallel ranks (self-launched torchrun), a checkpoint every step (`keep_last=2`, sync or async "
        "per restart), the whole process tree SIGKILLed at seeded moments and restarted each time.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| kills survived | {result['survived']}/{n} |",
        f"| kills by kind | " + ", ".join(f"{k} {v}" for k, v in by_kind.items()) + " |",
        f"| async legs | {sum(1 for x in result['kills'] if x['async'])}/{n} |",
        f"| per-step losses identical to an uninterrupted run (bitwise) | {'yes' if result['identical'] else 'no'} |",
        f"| one metrics record per step | {'yes' if result['one_record_per_step'] else 'no'} |",
        f"| tracker always named a complete, readable checkpoint; never went back | "
        f"{'yes' if not result['violations'] else 'no: ' + '; '.join(result['violations'][:3])} |",
        f"| tracked steps seen | {len(result['tracked'])} (last {result['tracked'][-1] if result['tracked'] else '-'}) |",
    ]
    if rank is not None:
        lines.append(f"| one rank killed: job ended | {'yes' if rank['ended'] else 'no'} in {rank['seconds']} s "
                     f"(collective timeout {COLLECTIVE_TIMEOUT_MIN:g} min), exit code {rank['exit_code']}, "
                     f"tracker readable: {'yes' if rank['tracker_readable'] else 'no'}; helper processes of the killed "
                     f"rank left behind: {rank['orphans']} |")
    if disk is not None:
        if "skipped" in disk:
            lines.append(f"| disk full during a save | skipped: {disk['skipped']} |")
        else:
            lines.append(f"| disk full during a save ({disk['tmpfs_bytes'] / 2**20:.1f} MiB tmpfs) | exit code "
                         f"{disk['exit_code']}, error names the directory: {'yes' if disk['names_directory'] else 'no'}, "
                         f"previous checkpoint intact: {'yes' if disk['previous_intact'] else 'no'} |")
    lines.append(f"| campaign wall time | {elapsed:.0f} s |")
    if disk is not None and disk.get("message"):
        lines += ["", "The disk-full error, as printed (under torchrun, so the job's exit code is torchrun's 1; each "
                  "rank exits 2):", "", "```", disk["message"], "```"]
    lines += ["", "Kills: " + ", ".join(f"{x['kind']}@{x['last_logged_step']}{'a' if x['async'] else 's'}"
                                         for x in result["kills"]) + " (kind @ last logged step, a/s = async/sync save)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3 x kills + 10)")
    p.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"kill kinds to draw from (default {','.join(KINDS)})")
    p.add_argument("--data-cache", type=Path, default=None, help="tokenised corpus cache (default inside --out)")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/reliability.md")
    p.add_argument("--no-rank-kill", action="store_true")
    p.add_argument("--no-disk-full", action="store_true")
    args = p.parse_args(argv)
    args.steps = args.steps or 3 * args.kills + 10
    args.kinds = [k for k in args.kinds.split(",") if k]
    if not args.kinds or set(args.kinds) - set(KINDS):
        p.error(f"--kinds: choose from {', '.join(KINDS)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="faults-"))
    out.mkdir(parents=True, exist_ok=True)
    cache = args.data_cache or out / "data_cache"
    began = time.time()
    try:
        reference = reference_run(args, out, cache)
        result = campaign(args, out, cache, reference)
        rank = None if args.no_rank_kill else kill_one_rank(args, out, cache)
        size = layout.complete_iterations(out / "reference" / "checkpoints")[-1]
        disk = None if args.no_disk_full else disk_full(args, out, cache, sum(f.stat().st_size for f in size.rglob("*") if f.is_file()))
        elapsed = time.time() - began
        text = report(args, result, rank, disk, elapsed)
        print(text)
        ok = result["survived"] == len(result["kills"]) and result["identical"] and result["one_record_per_step"]
        print(f"kills survived {result['survived']}/{len(result['kills'])}, losses identical: {'yes' if result['identical'] else 'no'}")
        (out / "result.json").write_text(json.dumps({"campaign": result, "one_rank": rank, "disk_full": disk}, indent=1))
        if not args.no_doc:
            header = "# Reliability\n\n" if not DOC.exists() else ""
            if header:
                DOC.write_text(header)
            replace_section(text, DOC)
        return 0 if ok else 1
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
