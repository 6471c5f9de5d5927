"""An ablation as data: which training runs, with which overrides, in which directories.

The one plan of runs behind both front doors: `nemotron-train ablate` trains it here (or
submits it with --slurm) and `nemotron-train sbatch --arms/--seeds` renders one batch job
per planned run. Both take the arms, the seeds, the run names and the run directories from
here.

Every arm at seed index k gets the same `train.seed`, which fixes both the initial weights
and the data order, so arms differ only in what the arm itself sets. The seeds are either
a count K (base seed + k for k < K, the base seed being the config's `train.seed` after the
user's overrides) or explicit `train.seed` values.

Arms (see ARMS) toggle `precision.fp8.*`; the `bf16` arm turns FP8 off and otherwise keeps
`precision.params_dtype` (fp32 on the CPU configs, where "bf16" means "no FP8"). There is
one `fp8-<recipe>` arm per FP8 recipe of the config schema.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from nemotron_train.config.loader import load_config
from nemotron_train.config.schema import FP8RecipeName, choices
from nemotron_train.errors import ConfigError

# Arm name -> the overrides that make it; the recipe arms follow the schema's FP8 recipes.
ARMS: Dict[str, Tuple[str, ...]] = {
    "bf16": ("precision.fp8.enabled=false",),
    "fp8": ("precision.fp8.enabled=true",),  # the config's own FP8 recipe
    **{f"fp8-{r}": ("precision.fp8.enabled=true", f"precision.fp8.recipe={r}") for r in choices(FP8RecipeName)},
}
# Keys every run sets itself; a user override of one would be silently overwritten.
OWNED_KEYS = ("run.output_dir", "run.name", "logging.wandb.group")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class AblationRun:
    """One training run: arm x seed index."""

    arm: str
    seed_index: int
    seed: int
    output_dir: str
    overrides: Tuple[str, ...]
    command: Tuple[str, ...]
    train_steps: int  # resolved train.steps: a run that logged fewer has not finished

    @property
    def label(self) -> str:
        return run_label(self.arm, self.seed_index)


@dataclass(frozen=True)
class AblationPlan:
    name: str  # the wandb group (logging.wandb.group) and the output root's directory name
    config: str
    output_root: str
    arms: Tuple[str, ...]
    seeds: Tuple[int, ...]  # train.seed of each seed index
    base_seed: int
    user_overrides: Tuple[str, ...]
    runs: Tuple[AblationRun, ...] = field(default_factory=tuple)

    def run_dirs(self) -> List[str]:
        return [r.output_dir for r in self.runs]

    def job_name(self, run: AblationRun, prefix: Optional[str] = None) -> str:
        """Scheduler job name of a run: `<prefix or plan name>-<run label>`, unique per run
        (a SLURM chain's singleton dependency runs same-name jobs one after another)."""
        return f"{prefix or self.name}-{run.label}"


def run_label(arm: str, seed_index: int) -> str:
    """Directory name of a run; `compare` labels curves by it."""
    return f"{arm}_s{seed_index}"


def parse_arms(text: str) -> Tuple[str, ...]:
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    if not arms:
        raise ConfigError(f"--arms {text!r}: give a comma-separated list, e.g. --arms bf16,fp8")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"--arms: unknown arm(s) {', '.join(unknown)}; available: {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise ConfigError(f"--arms {text!r} lists an arm twice; each arm runs once per seed")
    return arms


SeedSpec = Union[int, Sequence[int]]


def resolve_seeds(seeds: SeedSpec, base_seed: int) -> Tuple[int, ...]:
    """`train.seed` of each seed index: a count K gives base_seed .. base_seed + K - 1; a
    sequence gives its values (e.g. `nemotron-train sbatch --seeds 1234,1235`)."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"--seeds {seeds}: run at least one seed per arm")
        return tuple(base_seed + k for k in range(seeds))
    values = tuple(int(s) for s in seeds)
    if not values:
        raise ConfigError("--seeds: give at least one train.seed value per arm")
    if len(set(values)) != len(values):
        raise ConfigError(f"--seeds {','.join(map(str, values))} lists a seed twice; each seed runs once per arm")
    return values


def _override_key(item: str) -> str:
    return item.partition("=")[0].strip()


def _check_user_overrides(overrides: Sequence[str], arms: Sequence[str]) -> None:
    owned = set(OWNED_KEYS)
    for arm in arms:
        owned.update(_override_key(o) for o in ARMS[arm])
    clashes = sorted({_override_key(o) for o in overrides} & owned)
    if clashes:
        raise ConfigError(
            f"override(s) {', '.join(clashes)} are set per run by the ablation (arms {', '.join(arms)} and the run "
            "directories); remove them. Use --name/--output-root for where runs go, or add an arm for a new setting"
        )


def default_name(run_name: str, arms: Sequence[str]) -> str:
    return f"{run_name}-{'-vs-'.join(arms)}"


def build_plan(
    config: str,
    arms: Sequence[str],
    seeds: SeedSpec = 1,
    user_overrides: Sequence[str] = (),
    name: Optional[str] = None,
    output_root: Optional[str] = None,
    python: str = sys.executable,
) -> AblationPlan:
    """Resolve the config once, then derive and validate every run's overrides and command.

    `seeds` is a count or the train.seed values (see `resolve_seeds`). Raises ConfigError
    for a bad arm list, seed list, name, clashing override, or a run config that does not
    load (so nothing starts if any arm would fail to parse)."""
    arms = tuple(arms)
    _check_user_overrides(user_overrides, arms)
    cfg = load_config(config, list(user_overrides))
    name = name or default_name(cfg.run.name, arms)
    if not _NAME_RE.match(name):
        raise ConfigError(f"ablation name {name!r}: use letters, digits, '.', '_' and '-' (it names a directory)")
    root = Path(output_root) if output_root else Path(cfg.run.output_dir).parent / name
    seed_values = resolve_seeds(seeds, cfg.train.seed)
    runs = []
    for k, seed in enumerate(seed_values):
        for arm in arms:
            label = run_label(arm, k)
            out = str(root / label)
            overrides = (
                *user_overrides,
                *ARMS[arm],
                f"train.seed={seed}",
                f"run.output_dir={out}",
                f"run.name={label}",
                f"logging.wandb.group={name}",
            )
            run_cfg = load_config(config, list(overrides))  # fail before anything starts
            command = (python, "-m", "nemotron_train", "train", config, *overrides)
            runs.append(AblationRun(arm, k, seed, out, overrides, command, run_cfg.train.steps))
    return AblationPlan(name, config, str(root), arms, seed_values, seed_values[0], tuple(user_overrides), tuple(runs))
