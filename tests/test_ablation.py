"""`ablate` (plan construction, local runner, CLI) and `compare` (report and plot from
synthetic metrics.jsonl files). No training is run. `ablate --slurm` renders through the
sbatch front door: tests/test_launch_sbatch.py (rendering) and tests/test_ablation_slurm.py
(a real SLURM cluster)."""

import argparse
import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from nemotron_train.commands.ablate import register
from nemotron_train.ablation.plan import build_plan, parse_arms
from nemotron_train.ablation.report import PLOT_FILE, compare_runs
from nemotron_train.ablation.runner import PLAN_FILE, run_plan
from nemotron_train.config.loader import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "exp", "output_dir": str(tmp_path / "runs" / "exp")},
                                    "train": {"seed": 100}}))
    return str(path)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="nemotron-train")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _row(text: str, label: str):
    line = next(line for line in text.splitlines() if line.startswith(f"| `{label}`"))
    return [c.strip() for c in line.strip("|").split("|")]


def write_run(run_dir: Path, losses, tps=1000.0, val=None, fp8=False, seed=1, extra_lines=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"step": i + 1, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": tps,
                    "step_time_s": 0.5, "tflops_per_gpu": 1.5, "mfu": 0.01})
        for i, loss in enumerate(losses)
    ]
    for step, v in (val or {}).items():
        lines.append(json.dumps({"step": step, "val_loss": v}))
    (run_dir / "metrics.jsonl").write_text("\n".join(list(lines) + list(extra_lines)) + "\n")
    cfg = {"precision": {"params_dtype": "fp32", "fp8": {"enabled": fp8, "recipe": "tensorwise", "format": "hybrid",
                                                         "backend": "emulated"}}, "train": {"seed": seed}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


# --------------------------------------------------------------------------- plan


def test_arms_become_overrides_with_shared_seeds(config, tmp_path):
    plan = build_plan(config, parse_arms("bf16,fp8"), seeds=2, user_overrides=["train.steps=7", "train.seed=7"])
    assert plan.name == "exp-bf16-vs-fp8" and plan.base_seed == 7
    root = tmp_path / "runs" / "exp-bf16-vs-fp8"
    assert [r.label for r in plan.runs] == ["bf16_s0", "fp8_s0", "bf16_s1", "fp8_s1"]
    by_label = {r.label: r for r in plan.runs}
    assert by_label["bf16_s0"].overrides == (
        "train.steps=7", "train.seed=7", "precision.fp8.enabled=false", "train.seed=7",
        f"run.output_dir={root / 'bf16_s0'}", "run.name=bf16_s0", "logging.wandb.group=exp-bf16-vs-fp8",
    )
    assert "precision.fp8.enabled=true" in by_label["fp8_s1"].overrides
    # Same seed per seed index across arms: identical init and data order.
    assert by_label["bf16_s1"].seed == by_label["fp8_s1"].seed == 8
    cmd = by_label["fp8_s0"].command
    assert cmd[:5] == (sys.executable, "-m", "nemotron_train", "train", config)
    assert cmd[5:] == by_label["fp8_s0"].overrides
    assert plan.run_dirs()[0] == str(root / "bf16_s0")


def test_explicit_seed_values(config):
    plan = build_plan(config, ("bf16", "fp8"), seeds=[1234, 99])
    assert plan.seeds == (1234, 99) and plan.base_seed == 1234
    assert [(r.label, r.seed) for r in plan.runs] == [("bf16_s0", 1234), ("fp8_s0", 1234), ("bf16_s1", 99), ("fp8_s1", 99)]
    assert "train.seed=99" in plan.runs[3].overrides
    assert build_plan(config, ("bf16",), seeds=2).seeds == (100, 101)  # a count: from the config's train.seed
    assert plan.job_name(plan.runs[1]) == "exp-bf16-vs-fp8-fp8_s0" and plan.job_name(plan.runs[1], "j") == "j-fp8_s0"
    with pytest.raises(ConfigError, match="lists a seed twice"):
        build_plan(config, ("bf16",), seeds=[3, 3])
    with pytest.raises(ConfigError, match="at least one train.seed"):
        build_plan(config, ("bf16",), seeds=[])


def test_arms_follow_the_schema_recipes():
    from nemotron_train.ablation.plan import ARMS
    from nemotron_train.config.schema import FP8RecipeName, choices

    assert list(ARMS) == ["bf16", "fp8", *(f"fp8-{r}" for r in choices(FP8RecipeName))]
    assert ARMS["fp8-mxfp8"] == ("precision.fp8.enabled=true", "precision.fp8.recipe=mxfp8")


def test_recipe_arms_and_custom_root(config, tmp_path):
    plan = build_plan(config, parse_arms("fp8-delayed, fp8-mxfp8"), name="recipes", output_root=str(tmp_path / "a"))
    delayed = plan.runs[0]
    assert delayed.output_dir == str(tmp_path / "a" / "fp8-delayed_s0")
    assert {"precision.fp8.enabled=true", "precision.fp8.recipe=delayed", "logging.wandb.group=recipes"} <= set(
        delayed.overrides
    )


@pytest.mark.parametrize(
    "arms,kwargs,match",
    [
        ("bf16,fp9", {}, r"unknown arm\(s\) fp9; available: bf16, fp8"),
        ("bf16,bf16", {}, "lists an arm twice"),
        (" , ", {}, "comma-separated"),
        ("bf16,fp8", {"seeds": 0}, "--seeds 0"),
        ("bf16,fp8", {"user_overrides": ["precision.fp8.enabled=true"]}, r"precision.fp8.enabled are set per run"),
        ("bf16,fp8", {"user_overrides": ["run.output_dir=x"]}, r"run.output_dir are set per run"),
        ("bf16,fp8", {"user_overrides": ["precision.fp8.recpe=delayed"]}, r"precision.fp8.recpe.*did you mean"),
        ("bf16,fp8", {"name": "a b"}, "ablation name 'a b'"),
    ],
)
def test_plan_errors(config, arms, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_plan(config, parse_arms(arms), **kwargs)


# --------------------------------------------------------------------------- runner


class FakeTrainer:
    """Stands in for subprocess.run: writes metrics where the command says, or fails."""

    def __init__(self, fail=()):
        self.commands, self.fail = [], set(fail)

    def __call__(self, cmd):
        self.commands.append(cmd)
        out = Path(next(a for a in cmd if a.startswith("run.output_dir=")).split("=", 1)[1])
        fp8 = "precision.fp8.enabled=true" in cmd
        label = out.name
        if label in self.fail:
            return types.SimpleNamespace(returncode=3)
        write_run(out, [3.0, 2.5, 2.0 * (1.01 if fp8 else 1.0)], tps=1500.0 if fp8 else 1000.0, fp8=fp8)
        steps = int(next((a for a in cmd if a.startswith("train.steps=")), "train.steps=100").split("=")[1])
        (out / "summary.json").write_text(json.dumps({"steps": steps, "stopped_early": None}))
        return types.SimpleNamespace(returncode=0)


def test_run_plan_runs_every_arm_then_skips_finished_ones(config, tmp_path):
    plan = build_plan(config, ("bf16", "fp8"), seeds=2, user_overrides=["train.steps=3"], output_root=str(tmp_path / "abl"))
    trainer, logs = FakeTrainer(), []
    assert run_plan(plan, runner=trainer, log=logs.append) == {r.label: 0 for r in plan.runs}
    assert [c[5:] for c in trainer.commands] == [list(r.overrides) for r in plan.runs]
    assert json.loads((tmp_path / "abl" / PLAN_FILE).read_text())["runs"][1]["arm"] == "fp8"
    again = FakeTrainer()
    run_plan(plan, runner=again, log=logs.append)
    assert again.commands == [] and "already finished" in logs[-1]
    # A run stopped early (time limit, signal), or one asked to train longer, runs again.
    (tmp_path / "abl" / "fp8_s0" / "summary.json").write_text(json.dumps({"steps": 2, "stopped_early": "time"}))
    longer = build_plan(config, ("bf16",), user_overrides=["train.steps=5"], output_root=str(tmp_path / "abl"))
    run_plan(plan, runner=again, log=logs.append)
    run_plan(longer, runner=again, log=logs.append)
    ran = [Path(next(a for a in c if a.startswith("run.output_dir=")).split("=")[1]).name for c in again.commands]
    assert ran == ["fp8_s0", "bf16_s0"]
    run_plan(plan, runner=again, rerun=True, log=logs.append)
    assert len(again.commands) == 6


def test_run_plan_stops_at_a_failure_unless_keep_going(config, tmp_path):
    plan = build_plan(config, ("bf16", "fp8"), seeds=2, output_root=str(tmp_path / "abl"))
    assert run_plan(plan, runner=FakeTrainer(fail={"fp8_s0"}), log=lambda s: None) == {"bf16_s0": 0, "fp8_s0": 3}
    results = run_plan(plan, runner=FakeTrainer(fail={"fp8_s0"}), keep_going=True, rerun=True, log=lambda s: None)
    assert results == {"bf16_s0": 0, "fp8_s0": 3, "bf16_s1": 0, "fp8_s1": 0}


# --------------------------------------------------------------------------- compare


def test_compare_report_and_plot(tmp_path):
    root = tmp_path / "abl"
    base = [4.0 - 0.01 * i for i in range(100)]
    for seed, jitter in ((0, 0.0), (1, 0.002)):
        write_run(root / f"bf16_s{seed}", [v + jitter for v in base], tps=1000.0, val={50: 3.6, 100: 3.1}, seed=seed)
        write_run(root / f"fp8_s{seed}", [1.02 * (v + jitter) for v in base], tps=1400.0, val={100: 3.162},
                  fp8=True, seed=seed)
    dirs = [root / "fp8_s0", root / "bf16_s0", root / "fp8_s1", root / "bf16_s1"]
    report = compare_runs(dirs)
    assert report == root / "report.md"
    assert compare_runs(sorted(root.iterdir())) == report  # `compare ROOT/*`: report files are skipped
    text = report.read_text()
    png = (root / PLOT_FILE).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert f"![Loss curves]({PLOT_FILE})" in text
    assert "Baseline: `bf16_s0`" in text  # the bf16 arm, although listed second
    cells = _row(text, "fp8_s0")
    assert cells[1] == "fp8 tensorwise/hybrid (emulated)" and cells[2] == "0" and cells[3] == "100"
    assert cells[4] == f"{1.02 * base[-1]:.4f}"  # final loss
    assert cells[5] == f"{1.02 * base[-1]:.4f} (100)"  # min loss and its step
    assert cells[7:9] == ["`bf16_s0`", "+2.00%"]  # tail gap vs the same-seed bf16 run
    assert cells[9] == "3.1620" and cells[10] == "+2.00%"  # validation loss and gap
    assert cells[11] == "1,400" and cells[12] == "1.400"  # tokens/s and ratio
    # Paired by seed index: fp8_s1 is compared with bf16_s1 (exactly 2% apart), while the
    # second bf16 seed is compared with the baseline run, which shows the seed noise.
    assert _row(text, "fp8_s1")[7:9] == ["`bf16_s1`", "+2.00%"]
    assert _row(text, "bf16_s1")[7] == "`bf16_s0`" and _row(text, "bf16_s1")[8] != "+0.00%"
    assert "| `bf16_s0` (baseline) | fp32 (no fp8) |" in text
    arm_rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| fp8 |")
                or line.startswith("| bf16 |")}
    assert set(arm_rows) == {"fp8", "bf16"} and "| 2 |" in arm_rows["fp8"]
    assert "+2.0" in arm_rows["fp8"]  # arm-level gap (seed means)


def test_compare_handles_resumed_and_truncated_logs(tmp_path):
    run = tmp_path / "r" / "bf16_s0"
    # A resume re-logged step 3; the last write of a step wins. A killed run left half a line.
    write_run(run, [3.0, 2.0, 9.9], extra_lines=[json.dumps({"step": 3, "loss": 1.5}), '{"step": 4, "lo'])
    text = compare_runs([run], output=tmp_path / "out").read_text()
    assert _row(text, "bf16_s0")[3:6] == ["3", "1.5000", "1.5000 (3)"]
    assert "Unparsable metrics lines skipped: `bf16_s0`: 1" in text
    assert "Per arm" not in text  # one seed per arm: nothing to aggregate


def test_compare_errors(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        compare_runs([tmp_path / "missing"])
    write_run(tmp_path / "a" / "x", [1.0])
    write_run(tmp_path / "b" / "y", [1.0])
    with pytest.raises(ConfigError, match="--output DIR"):
        compare_runs([tmp_path / "a" / "x", tmp_path / "b" / "y"])
    with pytest.raises(ConfigError, match="--baseline 'z' is not one of the runs: x, y"):
        compare_runs([tmp_path / "a" / "x", tmp_path / "b" / "y"], output=tmp_path, baseline="z")
    # Same directory name under two parents: labels get the parent's name.
    write_run(tmp_path / "b" / "x", [2.0])
    text = compare_runs([tmp_path / "a" / "x", tmp_path / "b" / "x"], output=tmp_path).read_text()
    assert "`a/x`" in text and "`b/x`" in text


# --------------------------------------------------------------------------- CLI


def test_cli_accepts_options_after_overrides(config, capsys):
    args = _parse(["ablate", config, "train.steps=3", "--seeds", "2", "optimizer.lr=0.1", "--dry-run"])
    assert args.overrides == ["train.steps=3", "optimizer.lr=0.1"] and args.seeds == 2
    assert args.func(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 4 and all("train.steps=3 optimizer.lr=0.1 precision.fp8.enabled=" in p for p in printed)


def test_cli_compare(tmp_path, capsys):
    write_run(tmp_path / "bf16_s0", [2.0, 1.0])
    write_run(tmp_path / "fp8_s0", [2.0, 1.1])
    args = _parse(["compare", str(tmp_path / "bf16_s0"), "--output", str(tmp_path / "o"), str(tmp_path / "fp8_s0")])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "o" / "report.md")


def test_commands_are_registered_in_the_main_cli(config, capsys):
    import nemotron_train.cli as cli

    assert "nemotron_train.commands.ablate" in cli.COMMAND_MODULES
    args = _parse(["ablate", config, "--arms", "bf16,fp8-blockwise", "--dry-run"])
    assert args.func(args) == 0
    assert "precision.fp8.recipe=blockwise" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"unknown arm\(s\) fp16"):  # main() turns this into exit code 2
        args = _parse(["ablate", config, "--arms", "fp16"])
        args.func(args)
