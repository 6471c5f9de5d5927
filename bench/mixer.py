"""Forward+backward time of our torch Mamba-2 mixer vs transformers' NemotronH mixer (CPU).

Both sides get the same weights and inputs; the whole mixer and the SSD scan alone are
timed. Timings are interleaved (ours, theirs, ours, ...) so background load hits both
alike; the best of the repeats is the headline, the median is shown too. Prints a table
and replaces the `## Mamba-2 mixer (CPU)` section of docs/benchmarks.md.

    python bench/mixer.py [--batch 2 --seqlen 1024 ... --repeats 7 --no-write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.doc_section import replace_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Mamba-2 mixer (CPU)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--state", type=int, default=64)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; with 1 (default) the clock is the thread's CPU time, "
                        "which other jobs on a shared machine barely disturb; else wall time")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    return p.parse_args(argv)


def init_single_rank():
    """A gloo world of one with TP1/PP1 groups (mcore's parallel linears need a TP group)."""
    from nemotron_train.config import Config
    from nemotron_train.distributed.groups import init_process_groups
    from nemotron_train.platform import setup_platform

    return init_process_groups(Config(), setup_platform())


def build_mixers(a, pgs):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    from nemotron_train.models.mamba_mixer import MambaMixerSubmodules, TorchMambaMixer

    cfg = TransformerConfig(
        num_layers=1, hidden_size=a.d_model, num_attention_heads=1, use_cpu_initialization=True,
        mamba_num_heads=a.heads, mamba_head_dim=a.headdim, mamba_state_dim=a.state,
        mamba_num_groups=a.groups,
    )
    ours = TorchMambaMixer(
        cfg, MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
        d_model=a.d_model, chunk_size=a.chunk, pg_collection=pgs,
    )
    hf_cfg = NemotronHConfig(
        hidden_size=a.d_model, mamba_num_heads=a.heads, mamba_head_dim=a.headdim,
        ssm_state_size=a.state, n_groups=a.groups, conv_kernel=4, chunk_size=a.chunk,
        layer_norm_epsilon=1e-5, time_step_min=0.0, layers_block_type=["linear_attention"],
    )
    theirs = NemotronHMamba2Mixer(hf_cfg, layer_idx=0)
    weights = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    theirs.load_state_dict(weights, strict=True)
    return ours.train(), theirs.train()


def step_ours(mixer, x_LBD, g_LBD):
    x = x_LBD.detach().requires_grad_()
    out, _ = mixer(x)
    out.backward(g_LBD)
    return out


def step_theirs(mixer, x_LBD, g_LBD):
    x = x_LBD.detach().transpose(0, 1).requires_grad_()
    out = mixer(x)
    out.backward(g_LBD.transpose(0, 1))
    return out.transpose(0, 1)


def scan_inputs(a, mixer):
    """Inputs for the scan alone, at the scale the mixer feeds it (dt from its dt_bias, A
    from its A_log)."""
    g = torch.Generator().manual_seed(1)
    b, l, h, p, n, gr = a.batch, a.seqlen, a.heads, a.headdim, a.state, a.groups
    leaf = lambda t: t.requires_grad_()  # noqa: E731
    return dict(
        x=leaf(torch.randn(b, l, h, p, generator=g)),
        dt=leaf(F.softplus(torch.randn(b, l, h, generator=g) + mixer.dt_bias.detach())),
        A=leaf(-torch.exp(mixer.A_log.detach().clone())),
        B=leaf(torch.randn(b, l, gr, n, generator=g)),
        C=leaf(torch.randn(b, l, gr, n, generator=g)),
        D=leaf(torch.randn(h, generator=g)),
    )


def scan_ours(a, t, gy):
    from nemotron_train.models.ssd import ssd_chunked

    y = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], a.chunk, D_H=t["D"])
    y.backward(gy)
    return y


def scan_theirs(a, t, gy):
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    y = mamba2_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], a.chunk, D=t["D"])
    y.backward(gy)
    return y


def clock():
    # Single-threaded, CPU time of this thread measures the work itself: being descheduled
    # by other processes does not count. Multi-threaded work needs wall time.
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def step_projections(mixer, x_LBD, g_LBD, y_LBD):
    """in_proj and out_proj alone, forward + backward: the part both mixers share."""
    x, y = x_LBD.detach().requires_grad_(), y_LBD.detach().requires_grad_()
    zxBCdt, _ = mixer.in_proj(x)
    out, _ = mixer.out_proj(y)
    torch.autograd.backward([zxBCdt, out], [torch.ones_like(zxBCdt), g_LBD])


def compare(a, ours: tuple, theirs: tuple) -> dict:
    """Interleaved timings of two (fn, *args) calls; best and median of the repeats."""
    times, now = ([], []), clock()
    for i in range(a.warmup + a.repeats):
        for (fn, *args), acc in zip((ours, theirs), times):
            t0 = now()
            fn(*args)
            if i >= a.warmup:
                acc.append(now() - t0)
    (t_ours, t_theirs) = times
    return dict(ours_min=1e3 * min(t_ours), theirs_min=1e3 * min(t_theirs),
                ours_med=1e3 * statistics.median(t_ours),
                theirs_med=1e3 * statistics.median(t_theirs),
                speedup=min(t_theirs) / min(t_ours))


def run(a) -> dict:
    pgs = init_single_rank()
    torch.manual_seed(0)
    ours, theirs = build_mixers(a, pgs)
    x_LBD = torch.randn(a.seqlen, a.batch, a.d_model)
    g_LBD = torch.randn(a.seqlen, a.batch, a.d_model)
    diff = (step_ours(ours, x_LBD, g_LBD) - step_theirs(theirs, x_LBD, g_LBD)).abs().max().item()
    mixer = compare(a, (step_ours, ours, x_LBD, g_LBD), (step_theirs, theirs, x_LBD, g_LBD))
    y_LBD = torch.randn(a.seqlen, a.batch, a.heads * a.headdim)
    proj = (step_projections, ours, x_LBD, g_LBD, y_LBD)
    mixer["proj_ms"] = compare(a, proj, proj)["ours_min"]
    t = scan_inputs(a, ours)
    gy = torch.randn_like(t["x"])
    scan_diff = (scan_ours(a, t, gy) - scan_theirs(a, t, gy)).abs().max().item()
    scan = compare(a, (scan_ours, a, t, gy), (scan_theirs, a, t, gy))
    return dict(mixer=mixer, scan=scan, mixer_diff=diff, scan_diff=scan_diff)


def render(a, r) -> str:
    shape = (f"batch {a.batch}, seq {a.seqlen}, d_model {a.d_model}, heads {a.heads}x{a.headdim}, "
             f"state {a.state}, groups {a.groups}, chunk {a.chunk}, fp32")
    rows = [
        ("mixer: in_proj, conv, scan, gated norm, out_proj", r["mixer"]),
        ("SSD scan only: `ssd_chunked` vs `mamba2_chunk_scan`", r["scan"]),
    ]
    lines = [
        SECTION,
        "",
        "Forward + backward on CPU of `nemotron_train.models.mamba_mixer.TorchMambaMixer` vs",
        "transformers' `NemotronHMamba2Mixer` (its torch path), same weights and inputs, and",
        f"of the SSD scan alone. Best of {a.repeats} interleaved repeats, median in brackets;",
        "clock: " + ("CPU time of the single compute thread." if clock() is time.thread_time
                     else "wall."),
        "Reproduce: `python bench/mixer.py` (`--threads N` for wall-clock, multi-threaded).",
        "",
        f"- shape: {shape}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads: {torch.get_num_threads()}; {datetime.date.today().isoformat()}",
        "",
        "| fwd+bwd, ms | ours | transformers | speedup |",
        "|---|---|---|---|",
    ]
    for name, t in rows:
        lines.append(f"| {name} | {t['ours_min']:.1f} ({t['ours_med']:.1f}) | "
                     f"{t['theirs_min']:.1f} ({t['theirs_med']:.1f}) | **{t['speedup']:.2f}x** |")
    lines += [
        "",
        f"Outputs agree to {r['mixer_diff']:.1e} (mixer) and {r['scan_diff']:.1e} (scan), max abs.",
        f"Of each mixer's time, {r['mixer']['proj_ms']:.1f} ms is in_proj + out_proj, the same",
        "matmuls on both sides; that shared part bounds the mixer-level ratio (Amdahl).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    r = run(a)
    section = render(a, r)
    print(section)
    if not a.no_write:
        replace_section(section, DOC)
        print(f"updated {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
