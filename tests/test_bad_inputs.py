"""A catalogue of bad inputs: config files, overrides, command-line arguments, environment
variables, dataset files, checkpoints and Hugging Face directories.

Every case must end with exit code 2 and exactly one error line that names the key, file,
argument or variable, and no traceback. Cases that fail while the config is loaded or
validated run the command line in this process (milliseconds each); `train` cases and the
locale case run as subprocesses, since a `train` that got past its checks would start ranks.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# Small and valid on one process; data from the mock source unless a case says otherwise.
ONE = ["parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1", "data.source=mock", "train.steps=2"]
# A one-rank run on a blend: each dataset case names its prefix.
BLEND = ["parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1", "data.source=blend",
         "data.tokenizer.type=byte", "train.steps=2", "train.seq_length=32", "train.global_batch_size=4",
         "train.micro_batch_size=2"]


@dataclass
class Case:
    id: str
    argv: List[str]  # {d} is replaced by the case directory, {smoke} by configs/smoke.yaml
    needle: str  # must appear in the one error line ({d} replaced too)
    env: Dict[str, str] = field(default_factory=dict)
    subprocess: bool = False


def C(id, argv, needle, env=None, sub=False):
    return Case(id, argv, needle, env or {}, sub)


def plan(*overrides):
    return ["plan", "{smoke}", *overrides]


def blend(prefix, *extra):
    return ["train", "{smoke}", *BLEND, f"data.blend=[{{path: {prefix}, weight: 1.0}}]", "run.output_dir={d}/run", *extra]


CASES = [
    # ---------------------------------------------------------------- config files
    C("base-int", ["plan", "{d}/base_int.yaml"], "`base:` must be a file name or a list"),
    C("base-list-of-int", ["plan", "{d}/base_list.yaml"], "`base:` must be a file name"),
    C("base-missing", ["plan", "{d}/base_missing.yaml"], "nope.yaml"),
    C("base-circular", ["plan", "{d}/circ_a.yaml"], "circular `base:` include"),
    C("not-utf8", ["plan", "{d}/latin1.yaml"], "latin1.yaml: not UTF-8 text (byte 0xe9 on line 2)"),
    C("utf8-under-lc-all-c", ["plan", "{d}/utf8_bad_key.yaml"], "unknown config key `train.st",
      env={"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}, sub=True),
    C("anchor-self-reference", ["plan", "{d}/anchor.yaml"], "anchor.yaml: a YAML anchor refers to itself"),
    C("duplicate-section", ["plan", "{d}/dup_section.yaml"], "duplicate key 'train'"),
    C("duplicate-key", ["plan", "{d}/dup_key.yaml"], "dup_key.yaml: invalid YAML: line 3, column 3: duplicate key 'steps'"),
    C("yaml-syntax", ["plan", "{d}/syntax.yaml"], "syntax.yaml: invalid YAML: line"),
    C("top-level-list", ["plan", "{d}/toplist.yaml"], "top level must be a mapping"),
    C("unknown-key", ["plan", "{d}/unknown_key.yaml"], "unknown config key `train.stpes`"),
    C("unknown-section", ["plan", "{d}/unknown_section.yaml"], "unknown config key `trian`"),
    C("scalar-section", ["plan", "{d}/scalar_section.yaml"], "train (from"),
    C("list-for-int", ["plan", "{d}/list_for_int.yaml"], "train.steps (from"),
    C("config-missing", ["plan", "{d}/no_such.yaml"], "config file not found"),
    C("config-is-directory", ["plan", "{d}/adir.yaml"], "adir.yaml"),
    C("nan-in-file", ["plan", "{d}/nan_lr.yaml"], "optimizer.lr (from"),
    C("env-unset", ["plan", "{d}/env.yaml"], "NT_SURELY_UNSET_VAR is not set"),
    C("interpolation-unsupported", ["plan", "{d}/interp.yaml"], "unsupported interpolation"),
    # ---------------------------------------------------------------- overrides
    C("lr-nan", plan("optimizer.lr=nan"), "optimizer.lr (from command line): expected a finite number"),
    C("lr-inf", plan("optimizer.lr=.inf"), "optimizer.lr (from command line)"),
    C("min-lr-nan", plan("optimizer.min_lr=NaN"), "optimizer.min_lr"),
    C("clip-grad-inf", plan("optimizer.clip_grad=inf"), "optimizer.clip_grad"),
    C("norm-epsilon-nan", plan("model.norm_epsilon=nan"), "model.norm_epsilon"),
    C("init-std-minus-inf", plan("model.init_method_std=-inf"), "model.init_method_std"),
    C("exit-duration-nan", plan("train.exit_duration_minutes=nan"), "train.exit_duration_minutes"),
    C("split-nan", plan("data.source=blend", "data.blend=[{path: x, weight: 1.0}]", "data.split=nan,1,0"), "data.split"),
    C("blend-weight-nan", plan("data.source=blend", "data.blend=[{path: x, weight: .nan}]"), "data.blend[0].weight"),
    C("log-interval-0", plan("train.log_interval=0"), "train.log_interval=0"),
    C("exit-signal-sigkill", plan("train.exit_signal=SIGKILL"), "train.exit_signal=SIGKILL cannot be caught"),
    C("exit-signal-sigstop", plan("train.exit_signal=SIGSTOP"), "train.exit_signal=SIGSTOP"),
    C("exit-signal-sig-dfl", plan("train.exit_signal=SIG_DFL"), "train.exit_signal='SIG_DFL' is not a signal name"),
    C("exit-signal-unknown", plan("train.exit_signal=SIGFOO"), "train.exit_signal"),
    C("output-dir-empty", plan("run.output_dir="), "run.output_dir is empty"),
    C("warmup-beyond-run", plan("scheduler.warmup_steps=1000"), "scheduler.warmup_steps=1000 runs past the end"),
    C("wsd-decay-0", plan("scheduler.type=wsd", "scheduler.wsd_decay_steps=0"), "scheduler.wsd_decay_steps=0"),
    C("fp8-margin-negative", plan("precision.fp8.margin=-1"), "precision.fp8.margin=-1"),
    C("vocab-divisor-0", plan("model.make_vocab_size_divisible_by=0"), "model.make_vocab_size_divisible_by=0"),
    C("override-without-equals", plan("train.steps"), "override 'train.steps' is not of the form"),
    C("override-empty-component", plan("train..steps=3"), "empty key component"),
    C("override-anchor", plan("train.steps=&x [*x]"), "override train.steps: a YAML anchor refers to itself"),
    C("steps-not-int", plan("train.steps=abc"), "train.steps (from command line): expected an integer"),
    C("bool-not-bool", plan("parallel.sp=maybe"), "parallel.sp (from command line): expected true or false"),
    C("literal-choice", plan("model.spec=gpu"), "model.spec='gpu' is not supported"),
    C("steps-0", plan("train.steps=0"), "train.steps=0"),
    C("tp-does-not-divide-heads", plan("parallel.tp=3", "launch.nproc_per_node=3"), "parallel.tp=3"),
    C("pattern-bad-char", plan("model.pattern=MX-", "model.num_layers=3"), "model.pattern"),
    C("layers-vs-pattern", plan("model.num_layers=5"), "model.num_layers=5"),
    C("min-lr-above-lr", plan("optimizer.min_lr=1.0"), "optimizer.min_lr=1.0"),
    C("master-port-range", plan("launch.master_port=70000"), "launch.master_port=70000"),
    C("global-batch-indivisible", plan("train.global_batch_size=7"), "train.global_batch_size=7"),
    # ---------------------------------------------------------------- command-line arguments
    C("unknown-command", ["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    C("plan-device", ["plan", "{smoke}", "--device", "tpu"], "argument --device: invalid choice"),
    C("plan-world-size", ["plan", "{smoke}", "--world-size", "3"], "world size 3 is not divisible"),
    C("plan-world-size-text", ["plan", "{smoke}", "--world-size", "two"], "argument --world-size: invalid int value"),
    C("train-no-config", ["train"], "the following arguments are required: config"),
    C("preprocess-workers", ["preprocess", "--input", "{d}/docs.jsonl", "--output-prefix", "{d}/p", "--workers", "0"], "--workers 0"),
    C("preprocess-input-missing", ["preprocess", "--input", "{d}/none.jsonl", "--output-prefix", "{d}/p"], "none.jsonl"),
    C("preprocess-empty-jsonl", ["preprocess", "--input", "{d}/empty.jsonl", "--output-prefix", "{d}/e"],
      "--input {d}/empty.jsonl: no tokens for --json-keys text"),
    C("preprocess-duplicate-keys", ["preprocess", "--input", "{d}/docs.jsonl", "--output-prefix", "{d}/p", "--json-keys", "text", "text"], "--json-keys"),
    C("preprocess-bad-json", ["preprocess", "--input", "{d}/bad.jsonl", "--output-prefix", "{d}/b"], "bad.jsonl"),
    C("preprocess-tokenizer", ["preprocess", "--input", "{d}/docs.jsonl", "--output-prefix", "{d}/p", "--tokenizer", "nope"], "unknown tokenizer 'nope'"),
    C("export-shard-size", ["export-hf", "--checkpoint", "{d}/tracker_only", "--output", "{d}/o", "--max-shard-size", "abc"], "--max-shard-size 'abc'"),
    # ---------------------------------------------------------------- environment variables
    C("env-device-tpu-plan", plan(), "NEMOTRON_TRAIN_DEVICE='tpu'", env={"NEMOTRON_TRAIN_DEVICE": "tpu"}),
    C("env-device-tpu-train", ["train", "{smoke}", *ONE, "run.output_dir={d}/run"], "NEMOTRON_TRAIN_DEVICE='tpu'",
      env={"NEMOTRON_TRAIN_DEVICE": "tpu"}, sub=True),
    C("env-peak-tflops-text", plan(), "NEMOTRON_TRAIN_PEAK_TFLOPS='fast'", env={"NEMOTRON_TRAIN_PEAK_TFLOPS": "fast"}),
    C("env-peak-tflops-zero", plan(), "NEMOTRON_TRAIN_PEAK_TFLOPS='0'", env={"NEMOTRON_TRAIN_PEAK_TFLOPS": "0"}),
    # ---------------------------------------------------------------- launch
    C("master-addr-not-local", ["train", "{smoke}", "data.source=mock", "launch.master_addr=192.0.2.1", "run.output_dir={d}/run"],
      "launch.master_addr=192.0.2.1 cannot be bound on this machine", sub=True),
    C("master-addr-unresolvable", ["train", "{smoke}", "data.source=mock", "launch.master_addr=no-such-host.invalid", "run.output_dir={d}/run"],
      "launch.master_addr='no-such-host.invalid' is not a host name", sub=True),
    C("master-port-in-use", ["train", "{smoke}", "data.source=mock", "launch.master_port={busy_port}", "run.output_dir={d}/run"],
      "launch.master_port={busy_port} on 127.0.0.1 is already in use", sub=True),
    # ---------------------------------------------------------------- dataset files
    C("dataset-missing", blend("{d}/ds/none"), "{d}/ds/none.bin and {d}/ds/none.idx: not found", sub=True),
    C("dataset-truncated-bin", blend("{d}/ds/truncated"), "{d}/ds/truncated.bin:", sub=True),
    C("dataset-bad-idx-header", blend("{d}/ds/badheader"), "{d}/ds/badheader.idx", sub=True),
    C("dataset-empty", blend("{d}/ds/empty"), "{d}/ds/empty.bin: the dataset holds no tokens", sub=True),
    C("dataset-token-edited-mid-file", blend("{d}/ds/edited"), "{d}/ds/edited.bin: holds token id 60000", sub=True),
    # ---------------------------------------------------------------- checkpoints
    C("checkpoint-missing", ["export-hf", "--checkpoint", "{d}/no_ckpt", "--output", "{d}/o"], "--checkpoint {d}/no_ckpt: no such directory"),
    C("checkpoint-empty-dir", ["export-hf", "--checkpoint", "{d}/empty_dir", "--output", "{d}/o"], "--checkpoint {d}/empty_dir: no latest_checkpointed_iteration.txt"),
    C("checkpoint-tracker-dangling", ["export-hf", "--checkpoint", "{d}/tracker_only", "--output", "{d}/o"], "{d}/tracker_only/iter_0000005"),
    C("checkpoint-score-missing", ["score", "--checkpoint", "{d}/no_ckpt", "--text", "hi"], "--checkpoint {d}/no_ckpt"),
    C("checkpoint-tracker-garbage", ["export-hf", "--checkpoint", "{d}/ck_tracker_text", "--output", "{d}/o"],
      "ck_tracker_text/latest_checkpointed_iteration.txt: expected an iteration number"),
    C("checkpoint-meta-not-json", ["export-hf", "--checkpoint", "{d}/ck_meta_json", "--output", "{d}/o"],
      "ck_meta_json/iter_0000001/nemotron_train.json: not valid JSON"),
    C("checkpoint-meta-without-config", ["score", "--checkpoint", "{d}/ck_meta_noconfig", "--text", "hi"],
      "ck_meta_noconfig/iter_0000001/nemotron_train.json has no `config`"),
    C("checkpoint-meta-bad-config", ["export-hf", "--checkpoint", "{d}/ck_meta_badconfig", "--output", "{d}/o"],
      "ck_meta_badconfig/iter_0000001/nemotron_train.json: its run config is not valid here (model.hidden_size"),
    # ---------------------------------------------------------------- Hugging Face directories
    C("hf-no-config", ["import-hf", "--hf", "{d}/empty_dir", "--output", "{d}/o"], "--hf {d}/empty_dir: no config.json"),
    C("hf-config-not-json", ["import-hf", "--hf", "{d}/hf_badjson", "--output", "{d}/o"], "--hf {d}/hf_badjson: config.json is not valid JSON"),
    C("hf-config-a-list", ["import-hf", "--hf", "{d}/hf_list", "--output", "{d}/o"], "config.json holds a list"),
    C("hf-moe", ["import-hf", "--hf", "{d}/hf_moe", "--output", "{d}/o"], "layers_block_type[1]='moe'"),
    C("hf-size-not-a-number", ["import-hf", "--hf", "{d}/hf_nan_size", "--output", "{d}/o"], "config.json: a size or setting is not a number"),
    C("hf-missing-key", ["import-hf", "--hf", "{d}/hf_no_vocab", "--output", "{d}/o"], "config.json is missing `vocab_size`"),
    C("hf-no-weights", ["import-hf", "--hf", "{d}/hf_no_weights", "--output", "{d}/o"], "no model.safetensors"),
]

# A NemotronH config.json as transformers writes it (the keys our importer reads).
HF_CONFIG = dict(
    model_type="nemotron_h", vocab_size=96, hidden_size=64, intermediate_size=128, hybrid_override_pattern="M*-M-",
    num_attention_heads=8, num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16,
    ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8, layer_norm_epsilon=1e-5,
    max_position_embeddings=256, tie_word_embeddings=False,
)


def _write_dataset(prefix: Path, tokens: np.ndarray, lengths) -> None:
    from nemotron_train.data.indexed import IndexedWriter

    writer = IndexedWriter(str(prefix), np.uint16)
    if len(tokens):
        writer.add(tokens, np.asarray(lengths))
    writer.finalize()


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    files = {
        "base_int.yaml": "base: 5\n",
        "base_list.yaml": "base: [5]\n",
        "base_missing.yaml": "base: nope.yaml\n",
        "circ_a.yaml": "base: circ_b.yaml\n",
        "circ_b.yaml": "base: circ_a.yaml\n",
        "utf8_bad_key.yaml": f"base: {SMOKE}\nrun:\n  name: café\ntrain:\n  stéps: 3\n",
        "anchor.yaml": "data:\n  blend: &b\n    - *b\n",
        "dup_section.yaml": "train:\n  steps: 3\ntrain:\n  seed: 1\n",
        "dup_key.yaml": "train:\n  steps: 3\n  steps: 4\n",
        "syntax.yaml": "train: {steps: [\n",
        "toplist.yaml": "- a\n- b\n",
        "unknown_key.yaml": "train:\n  stpes: 3\n",
        "unknown_section.yaml": "trian:\n  steps: 3\n",
        "scalar_section.yaml": "train: 5\n",
        "list_for_int.yaml": "train:\n  steps: [1]\n",
        "nan_lr.yaml": f"base: {SMOKE}\noptimizer:\n  lr: .nan\n",
        "env.yaml": f"base: {SMOKE}\nrun:\n  name: ${{oc.env:NT_SURELY_UNSET_VAR}}\n",
        "interp.yaml": f"base: {SMOKE}\nrun:\n  name: ${{foo.bar}}\n",
        "docs.jsonl": '{"text": "hello"}\n',
        "empty.jsonl": "",
        "bad.jsonl": '{"text": "ok"}\n{not json\n',
        "hf_badjson/config.json": "{\n",
        "hf_list/config.json": "[1, 2]\n",
        "hf_moe/config.json": json.dumps({**HF_CONFIG, "hybrid_override_pattern": None, "layers_block_type": ["mamba", "moe"]}),
        "hf_nan_size/config.json": json.dumps({**HF_CONFIG, "hidden_size": "sixty-four"}),
        "hf_no_vocab/config.json": json.dumps({k: v for k, v in HF_CONFIG.items() if k != "vocab_size"}),
        "hf_no_weights/config.json": json.dumps(HF_CONFIG),
        "tracker_only/latest_checkpointed_iteration.txt": "5\n",
        "ck_tracker_text/latest_checkpointed_iteration.txt": "abc\n",
        "ck_meta_json/latest_checkpointed_iteration.txt": "1\n",
        "ck_meta_json/iter_0000001/nemotron_train.json": "{\n",
        "ck_meta_noconfig/latest_checkpointed_iteration.txt": "1\n",
        "ck_meta_noconfig/iter_0000001/nemotron_train.json": json.dumps({"step": 1}),
        "ck_meta_badconfig/latest_checkpointed_iteration.txt": "1\n",
        "ck_meta_badconfig/iter_0000001/nemotron_train.json": json.dumps({"step": 1, "config": {"model": {"hidden_size": "x"}}}),
    }
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text, encoding="utf-8")
    (d / "latin1.yaml").write_bytes(b'run:\n  name: "caf\xe9"\n')
    (d / "adir.yaml").mkdir()
    (d / "empty_dir").mkdir()
    # Datasets: 3 MiB of tokens, so a token in the middle lies outside the first and last MiB.
    ds = d / "ds"
    ds.mkdir()
    tokens = (np.arange(3 << 19) % 250).astype(np.uint16)
    lengths = [len(tokens) // 64] * 64
    for name in ("good", "edited", "truncated", "badheader"):
        _write_dataset(ds / name, tokens, lengths)
    with open(ds / "edited.bin", "r+b") as f:  # same size, ends untouched: an edit in the middle
        f.seek(len(tokens))
        f.write(np.array([60000], dtype=np.uint16).tobytes())
    with open(ds / "truncated.bin", "r+b") as f:
        f.truncate(len(tokens))
    with open(ds / "badheader.idx", "r+b") as f:
        f.write(b"NOTANIDX")
    _write_dataset(ds / "empty", np.zeros(0, np.uint16), [])
    return d


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _fill(text: str, d: Path, busy_port: int) -> str:
    return text.replace("{d}", str(d)).replace("{smoke}", SMOKE).replace("{busy_port}", str(busy_port))


def _run(case: Case, d: Path, busy_port: int, capsys, monkeypatch) -> Tuple[int, str]:
    argv = [_fill(a, d, busy_port) for a in case.argv]
    if case.subprocess:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(PYTHONWARNINGS="ignore", **case.env)
        proc = subprocess.run([sys.executable, "-m", "nemotron_train", *argv], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)
        return proc.returncode, proc.stderr
    from nemotron_train import cli

    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(d)
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


def test_the_catalogue_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error(case, case_dir, busy_port, capsys, monkeypatch):
    rc, err = _run(case, case_dir, busy_port, capsys, monkeypatch)
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert rc == 2 and len(errors) == 1, f"rc={rc}\n{err[-3000:]}"
    assert _fill(case.needle, case_dir, busy_port) in errors[0], errors[0]


# ---------------------------------------------------------------- the same inputs, done right


def test_a_utf8_config_loads_under_the_c_locale(case_dir):
    path = case_dir / "utf8_ok.yaml"
    path.write_text(f"base: {SMOKE}\nrun:\n  name: café-run\n", encoding="utf-8")
    code = "from nemotron_train.config import load_config; print(load_config(%r).run.name)" % str(path)
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "café-run", proc.stderr


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """Only keys given twice are refused: a `<<:` merge followed by an explicit key is not."""
    from nemotron_train.config import load_config

    path = tmp_path / "merge.yaml"
    path.write_text(f"base: {SMOKE}\noptimizer:\n  <<: {{lr: 1.0e-3, min_lr: 1.0e-5}}\n  lr: 2.0e-3\n", encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (2e-3, 1e-5)


def test_plan_warns_beyond_the_largest_known_device(capsys):
    from nemotron_train import cli
    from nemotron_train.platform.devices import largest_device

    assert cli.main(["plan", SMOKE, "model.hidden_size=1000000000000", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"exceeds the largest known device ({largest_device().name}" in err
    assert cli.main(["plan", SMOKE, "--device", "cpu"]) == 0
    assert "largest known device" not in capsys.readouterr().err


def test_preprocess_allow_empty_writes_with_a_warning(case_dir, capsys):
    from nemotron_train import cli

    out = case_dir / "allowed"
    assert cli.main(["preprocess", "--input", str(case_dir / "empty.jsonl"), "--output-prefix", str(out),
                     "--allow-empty", "--no-progress"]) == 0
    assert "warning:" in capsys.readouterr().err
    assert (case_dir / "allowed_text_document.idx").is_file()


def test_a_refused_empty_preprocess_leaves_no_files(case_dir, capsys):
    from nemotron_train import cli

    assert cli.main(["preprocess", "--input", str(case_dir / "empty.jsonl"), "--output-prefix", str(case_dir / "refused")]) == 2
    assert not list(case_dir.glob("refused*"))


def test_the_intact_dataset_trains_past_the_checks(case_dir):
    """The control for the dataset cases: the same files unharmed pass every check."""
    from nemotron_train.config import load_config
    from nemotron_train.data import check_data_config

    prefix = case_dir / "ds" / "good"
    shutil.rmtree(case_dir / "run", ignore_errors=True)
    check_data_config(load_config(SMOKE, [*BLEND, f"data.blend=[{{path: {prefix}, weight: 1.0}}]",
                                          f"run.output_dir={case_dir / 'run'}"]))
