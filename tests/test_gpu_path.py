"""The GPU path, checked on CPU where the logic allows: performance.* resolution, the engine
fields `plan --engine` prints (and the trainer uses), MFU peaks, device mapping, the
deterministic-TE environment, TE autocast/model-init structure (with a stand-in TE module),
the GPU-kernel check, manual GC, torch.compile off on CPU, and docs citing real tests."""

from __future__ import annotations

import contextlib
import enum
import gc
import json
import re
import sys
import types
from pathlib import Path

import pytest

from nemotron_train.config.loader import load_config
from nemotron_train.config.performance import GPU_ONLY_FLAGS, resolve_performance
from nemotron_train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMOKE = CONFIGS / "smoke.yaml"


def cfg(*overrides, path=None):
    return load_config(path, list(overrides))


# ----------------------------------------------------------------- performance.* resolution


def test_cpu_defaults_are_off_and_gpu_defaults_on():
    c = cfg("parallel.tp=2", "parallel.sp=true")
    cpu = resolve_performance(c, "cpu", "local")
    for key in GPU_ONLY_FLAGS + ("overlap_grad_reduce", "overlap_param_gather", "cross_entropy_loss_fusion", "torch_compile"):
        assert getattr(cpu, key) is False, key
    gpu = resolve_performance(c, "cuda", "te", "2.8")
    for key in GPU_ONLY_FLAGS + ("overlap_grad_reduce", "overlap_param_gather", "cross_entropy_loss_fusion", "torch_compile"):
        assert getattr(gpu, key) is True, key
    # CUDA with the local spec: DDP overlap and compile yes, TE/apex fusions no.
    local = resolve_performance(c, "cuda", "local")
    assert local.overlap_grad_reduce and local.torch_compile
    assert not (local.gradient_accumulation_fusion or local.tp_comm_overlap or local.masked_softmax_fusion)


@pytest.mark.parametrize("key", GPU_ONLY_FLAGS)
def test_forcing_a_gpu_only_setting_on_cpu_is_one_clear_error(key):
    with pytest.raises(ConfigError, match=rf"performance\.{key}=true needs CUDA .*this run is on CPU.*{key}=false"):
        resolve_performance(cfg(f"performance.{key}=true", "parallel.tp=2", "parallel.sp=true"), "cpu", "local")


def test_other_refusals_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="cuda_graph_impl=transformer_engine needs CUDA.*cuda_graph_impl=none"):
        resolve_performance(cfg("performance.cuda_graph_impl=transformer_engine"), "cpu", "local")
    with pytest.raises(ConfigError, match="cross_entropy_fusion_impl=te needs TransformerEngine"):
        resolve_performance(cfg("performance.cross_entropy_loss_fusion=true", "performance.cross_entropy_fusion_impl=te"),
                            "cpu", "local")
    with pytest.raises(ConfigError, match="parallel.tp > 1 and parallel.sp=true"):
        resolve_performance(cfg("performance.tp_comm_overlap=true"), "cuda", "te", "2.8")
    with pytest.raises(ConfigError, match="use_distributed_optimizer=true"):
        resolve_performance(cfg("performance.overlap_param_gather=true", "optimizer.use_distributed_optimizer=false"),
                            "cuda", "local")
    with pytest.raises(ConfigError, match="average_in_collective=false"):
        resolve_performance(cfg("performance.average_in_collective=true"), "cpu", "local")
    # DDP overlap itself runs anywhere (checked on gloo by test_gpu_path_parallel.py).
    assert resolve_performance(cfg("performance.overlap_grad_reduce=true"), "cpu", "local").overlap_grad_reduce


def test_tp_overlap_with_fp8_and_bf16_edge_layers_needs_te_2_8():
    c = cfg("parallel.tp=2", "parallel.sp=true", "precision.fp8.enabled=true", "precision.fp8.first_last_layers_bf16=1")
    with pytest.raises(ConfigError, match=r"TransformerEngine >= 2\.8.*found 2\.7\.0.*tp_comm_overlap=false"):
        resolve_performance(c, "cuda", "te", "2.7.0")
    assert resolve_performance(c, "cuda", "te", "2.8.0").tp_comm_overlap
    # Without BF16 edge layers, or without FP8, older TE is fine.
    ok = cfg("parallel.tp=2", "parallel.sp=true", "precision.fp8.enabled=true")
    assert resolve_performance(ok, "cuda", "te", "2.7.0").tp_comm_overlap


# ----------------------------------------------------------------- engine fields, plan --engine


def _gpu_run(path, *overrides, device="h100"):
    from nemotron_train.commands.plan import resolve_for_device

    c = load_config(path, list(overrides))
    return resolve_for_device(c, c.launch.nproc_per_node * c.launch.nnodes, device)


def test_56b_engine_fields_turn_the_bridge_settings_on_and_mcore_accepts_them():
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    from nemotron_train.models.build import transformer_kwargs
    from nemotron_train.models.engine_config import ddp_kwargs, engine_fields, optimizer_kwargs

    run = _gpu_run(CONFIGS / "nemotron_h_56b_pretrain.yaml")
    fields = engine_fields(run)
    t, d = fields["TransformerConfig"], fields["DistributedDataParallelConfig"]
    for key in ("gradient_accumulation_fusion", "masked_softmax_fusion", "persist_layer_norm",
                "cross_entropy_loss_fusion", "tp_comm_overlap"):
        assert t[key] is True, key
    assert t["cuda_graph_impl"] == "transformer_engine" and t["cuda_graph_scope"] == ["mamba"]
    assert t["fp8"] == "hybrid" and t["fp8_recipe"] == "tensorwise" and t["num_layers_at_start_in_bf16"] == 2
    assert d["overlap_grad_reduce"] is True and d["average_in_collective"] is False
    assert fields["te_fp8_recipe"]["class"].endswith("Float8CurrentScaling")
    assert fields["trainer"] == {"manual_gc": True, "manual_gc_interval": 100, "torch_compile": True}
    # The trainer builds its configs from the same functions; megatron-core takes every field.
    tc = TransformerConfig(**transformer_kwargs(run))
    assert tc.tp_comm_overlap and tc.cross_entropy_loss_fusion
    assert DistributedDataParallelConfig(**ddp_kwargs(run)).overlap_grad_reduce
    assert OptimizerConfig(**optimizer_kwargs(run)).bf16


def test_fp8_param_gather_reaches_the_ddp_config():
    from nemotron_train.models.engine_config import ddp_kwargs

    run = _gpu_run(CONFIGS / "nemotron_h_8b_pretrain.yaml", "precision.fp8.fp8_param_gather=true")
    assert ddp_kwargs(run)["fp8_param_gather"] is True
    assert ddp_kwargs(_gpu_run(CONFIGS / "nemotron_h_8b_pretrain.yaml"))["fp8_param_gather"] is False


def test_plan_engine_cli_json_on_cpu_and_cuda(capsys):
    from nemotron_train.cli import main

    def plan(*args):
        assert main(["plan", str(SMOKE), *args, "--engine", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    cpu = plan("--device", "cpu")
    assert cpu["device"] == "cpu" and cpu["spec"] == "local"
    assert cpu["TransformerConfig"]["gradient_accumulation_fusion"] is False
    assert cpu["DistributedDataParallelConfig"]["overlap_grad_reduce"] is False
    assert cpu["trainer"]["torch_compile"] is False
    gpu = plan("model.spec=auto", "--device", "cuda")
    assert gpu["device"] == "cuda" and gpu["spec"] == "te"
    assert gpu["TransformerConfig"]["tp_comm_overlap"] is True  # smoke: tp 2 with sequence parallelism
    assert gpu["DistributedDataParallelConfig"]["overlap_grad_reduce"] is True
    # Forcing a GPU-only key for a CPU plan: exit code 2, one message.
    assert main(["plan", str(SMOKE), "performance.tp_comm_overlap=true", "--device", "cpu", "--engine"]) == 2
    assert "performance.tp_comm_overlap=true needs CUDA" in capsys.readouterr().err


# ----------------------------------------------------------------- MFU peaks, device, environment


def test_mfu_peak_follows_the_device_table_and_the_gemm_precision():
    from nemotron_train.training.metrics import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", fp8_gemms=False) == 989.0
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", fp8_gemms=True) == 1979.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe", fp8_gemms=False) == 756.0  # not an SXM
    assert gpu_peak_tflops("NVIDIA H100 NVL", fp8_gemms=True) == 1671.0
    assert gpu_peak_tflops("NVIDIA GB200", fp8_gemms=False) == 2450.0
    assert gpu_peak_tflops("NVIDIA GB200", fp8_gemms=True) == 4900.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", fp8_gemms=True) == 312.0  # no FP8 tensor cores
    import nemotron_train.training.metrics as metrics

    assert not hasattr(metrics, "GPU_PEAK_TFLOPS")  # one table: platform/devices.py


def test_cuda_device_follows_the_visible_devices():
    from nemotron_train.platform import cuda_device_index

    assert cuda_device_index(5, 8) == 5  # torchrun: every GPU of the node visible
    assert cuda_device_index(5, 1) == 0  # SLURM binding one GPU per task
    assert cuda_device_index(3, 2) == 1
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        cuda_device_index(0, 0)


def test_deterministic_runs_forbid_nondeterministic_te_attention(monkeypatch):
    from nemotron_train.platform import deterministic_env, setup_platform

    assert deterministic_env(False) == {}
    monkeypatch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "1")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    setup_platform(force_cpu=True, deterministic=True)
    import os

    assert os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    # configs/smoke.yaml is deterministic: resolved for a GPU it would build TE attention.
    assert load_config(SMOKE).train.deterministic


def test_torch_compile_is_a_config_key_decided_once():
    import torch._dynamo

    from nemotron_train.platform import Platform
    from nemotron_train.platform import setup_platform
    from nemotron_train.resolve import resolve_run

    run = resolve_run(cfg("data.source=mock", "model.spec=local"), 1, Platform("cpu", "gloo"))
    assert run.performance.torch_compile is False
    forced = resolve_run(cfg("data.source=mock", "model.spec=local", "performance.torch_compile=true"), 1,
                         Platform("cpu", "gloo"))
    assert forced.performance.torch_compile is True
    try:
        setup_platform(force_cpu=True, torch_compile=True)
        assert torch._dynamo.config.disable is False
    finally:
        setup_platform(force_cpu=True, torch_compile=False)
    assert torch._dynamo.config.disable is True


def test_spec_auto_needs_causal_conv1d_too():
    from nemotron_train.platform import GPU_KERNEL_MODULES
    from nemotron_train.resolve import resolve_spec

    assert "causal_conv1d" in GPU_KERNEL_MODULES
    assert resolve_spec("auto", "cuda", ["causal_conv1d"]) == "local"
    with pytest.raises(ConfigError, match="causal_conv1d"):
        resolve_spec("te", "cuda", ["causal_conv1d"])


def test_manual_gc_collects_on_schedule_only():
    from nemotron_train.training.manual_gc import ManualGC

    was = gc.isenabled()
    gc.enable()
    try:
        m = ManualGC(True, 3)
        assert not gc.isenabled()
        assert [m.step(s) for s in range(1, 7)] == [False, False, True, False, False, True]
        assert m.collections == 2
        m.close()
        assert gc.isenabled()
        off = ManualGC(False, 3)
        assert gc.isenabled() and not off.step(3)
    finally:
        (gc.enable if was else gc.disable)()


def test_docs_cite_only_tests_that_exist():
    cited = set()
    for doc in list((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        cited |= set(re.findall(r"tests/[\w/]+\.py", doc.read_text()))
    missing = sorted(p for p in cited if not (ROOT / p).exists())
    assert not missing, f"docs cite tests that do not exist: {missing}"


# ----------------------------------------------------------------- TE structure, stand-in TE


@pytest.fixture
def fake_te(monkeypatch):
    """transformer_engine stand-in recording autocast / model-init regions (current TE API
    names plus the deprecated `fp8_autocast`, which must not be used)."""

    import nemotron_train.fp8.runtime  # noqa: F401 - megatron-core imports before the stand-in exists

    class Format(enum.Enum):
        E4M3 = "e4m3"
        HYBRID = "hybrid"

    log = []

    @contextlib.contextmanager
    def region(kind, **kwargs):
        log.append(("enter", kind, kwargs))
        yield
        log.append(("exit", kind, kwargs))

    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    recipe_mod.Format = Format
    for name in ("DelayedScaling", "Float8CurrentScaling", "MXFP8BlockScaling", "Float8BlockScaling"):
        setattr(recipe_mod, name, lambda _n=name, **kw: (_n, kw))
    te = types.ModuleType("transformer_engine.pytorch")
    te.autocast = lambda **kw: region("autocast", **kw)
    te.fp8_autocast = lambda **kw: pytest.fail("deprecated te.fp8_autocast called while te.autocast exists")
    te.quantized_model_init = lambda **kw: region("model_init", **kw)
    te.fp8_model_init = lambda **kw: pytest.fail("deprecated te.fp8_model_init called")
    common = types.ModuleType("transformer_engine.common")
    common.recipe = recipe_mod
    root = types.ModuleType("transformer_engine")
    root.common, root.pytorch = common, te
    for name, mod in {"transformer_engine": root, "transformer_engine.common": common,
                      "transformer_engine.common.recipe": recipe_mod, "transformer_engine.pytorch": te}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return log


def _forward_regions(ctx, num_layers):
    """Enter the contexts as HybridStack.forward does: outer once, then each layer's."""
    with ctx.outer():
        for i in range(num_layers):
            with ctx(i):
                pass


def test_delayed_scaling_is_one_outer_region(fake_te):
    from nemotron_train.fp8 import layer_fp8_context

    c = cfg("model.num_layers=6", "precision.fp8.enabled=true", "precision.fp8.recipe=delayed")
    _forward_regions(layer_fp8_context(c, "te", amax_group="grp"), 6)
    enters = [e for e in fake_te if e[0] == "enter"]
    assert len(enters) == 1 and enters[0][1] == "autocast"
    assert enters[0][2]["amax_reduction_group"] == "grp" and enters[0][2]["recipe"][0] == "DelayedScaling"


def test_current_scaling_is_per_layer_and_skips_bf16_layers(fake_te):
    from nemotron_train.fp8 import layer_fp8_context

    c = cfg("model.num_layers=6", "precision.fp8.enabled=true", "precision.fp8.first_last_layers_bf16=1")
    _forward_regions(layer_fp8_context(c, "te"), 6)
    enters = [e for e in fake_te if e[0] == "enter"]
    assert len(enters) == 4 and all(e[1] == "autocast" for e in enters)  # layers 1..4


def test_fp8_param_gather_builds_fp8_layers_under_te_model_init(fake_te):
    from nemotron_train.fp8 import layer_fp8_context

    c = cfg("model.num_layers=6", "precision.fp8.enabled=true", "precision.fp8.first_last_layers_bf16=1",
            "precision.fp8.fp8_param_gather=true")
    ctx = layer_fp8_context(c, "te")
    built = []
    for i in range(6):
        before = len(fake_te)
        with ctx.init(i):
            pass
        built.append(len(fake_te) > before)
    assert built == [False, True, True, True, True, False]
    assert all(e[1] == "model_init" for e in fake_te)
    off = layer_fp8_context(cfg("precision.fp8.enabled=true"), "te")
    with off.init(1):
        pass
    assert len([e for e in fake_te if e[0] == "enter"]) == 4


def test_tp_comm_overlap_creates_userbuffers_before_the_model():
    from nemotron_train.models.engine_config import init_tp_comm_overlap

    calls = []
    te = types.SimpleNamespace(module=types.SimpleNamespace(base=types.SimpleNamespace(
        initialize_ub=lambda **kw: calls.append(kw))))
    run = _gpu_run(CONFIGS / "nemotron_h_8b_pretrain.yaml")
    assert init_tp_comm_overlap(run, te_module=te)
    assert calls == [{"shape": [8192, 4096], "tp_size": 2, "use_fp8": True, "bootstrap_backend": "nccl"}]
    assert not init_tp_comm_overlap(_gpu_run(CONFIGS / "nemotron_h_8b_pretrain.yaml",
                                             "performance.tp_comm_overlap=false"), te_module=te)


def test_cuda_graphs_are_captured_once_after_the_warmup():
    from nemotron_train.training.cuda_graphs import CudaGraphCapture

    calls = []

    class Helper:  # stands in for megatron-core's TECudaGraphHelper (TE + CUDA)
        def __init__(self, **kwargs):
            calls.append(("init", sorted(kwargs)))

        def create_cudagraphs(self):
            calls.append(("capture",))

        def cuda_graph_set_manual_hooks(self):
            calls.append(("hooks",))

    run = _gpu_run(CONFIGS / "nemotron_h_56b_pretrain.yaml", "performance.overlap_param_gather=true")
    cap = CudaGraphCapture(run, model="m", tcfg="c", optimizer="o", helper_factory=Helper)
    assert [cap.after_step(s, first_step=10) for s in range(11, 16)] == [False, False, True, False, False]
    assert calls == [("init", ["config", "micro_batch_size", "model", "optimizers", "seq_length"]), ("capture",),
                     ("hooks",)]
    off = CudaGraphCapture(_gpu_run(CONFIGS / "nemotron_h_8b_pretrain.yaml"), "m", "c", "o", helper_factory=Helper)
    assert not off.enabled and not any(off.after_step(s) for s in range(10))


def test_the_stack_runs_its_layers_inside_one_outer_region():
    """HybridStack enters `outer()` once per forward, every layer's context inside it, and
    builds each layer inside `init(index)`."""
    import torch
    from megatron.core.process_groups_config import ProcessGroupCollection

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_utils import single_process_group

    from nemotron_train.fp8.runtime import LayerFP8Contexts
    from nemotron_train.models import build as build_mod
    from nemotron_train.platform import Platform, setup_platform
    from nemotron_train.resolve import resolve_run

    log = []

    def region(name):
        @contextlib.contextmanager
        def ctx():
            log.append(("enter", name))
            yield
            log.append(("exit", name))
        return ctx()

    recording = LayerFP8Contexts(lambda i: region(f"layer{i}"), outer=lambda: region("outer"),
                                 init=lambda i: region(f"init{i}"))
    setup_platform(force_cpu=True)
    run = resolve_run(cfg("model.spec=local", "parallel.tp=1", "parallel.sp=false", "data.source=mock",
                          "launch.nproc_per_node=1", path=SMOKE), 1, Platform("cpu", "gloo"))
    original = build_mod.layer_fp8_context
    build_mod.layer_fp8_context = lambda *a, **k: recording
    try:
        with single_process_group():
            model = build_mod.build_model(run, ProcessGroupCollection.use_mpu_process_groups())
            n = run.cfg.model.num_layers
            assert [e for e in log if e[0] == "enter"] == [("enter", f"init{i}") for i in range(n)]
            log.clear()
            tokens = torch.zeros(1, 16, dtype=torch.long)
            model(tokens, torch.arange(16)[None], None)
    finally:
        build_mod.layer_fp8_context = original
    names = [f"{kind}:{name}" for kind, name in log]
    assert names[0] == "enter:outer" and names[-1] == "exit:outer"
    assert names[1:-1] == [f"{k}:layer{i}" for i in range(n) for k in ("enter", "exit")]
