"""Delayed-scaling bookkeeping: TE's roll, `max` vs `most_recent`, scales from earlier steps."""

import pytest
import torch

from nemotron_train.fp8 import FP8Recipe, update_history_and_scale
from nemotron_train.fp8.scaling import new_delayed_buffers, record_amax, step_delayed_scaling

MAXES = torch.tensor([448.0, 448.0, 57344.0])


def _run_steps(recipe, amaxes_per_step):
    """Record one amax triple per step, end the step, and return the scale after each."""
    history, scale = new_delayed_buffers(recipe.amax_history_len, torch.device("cpu"))
    scales = []
    for amaxes in amaxes_per_step:
        for slot, a in enumerate(amaxes):
            record_amax(history, slot, torch.tensor(a))
        update_history_and_scale(history, scale, recipe)
        scales.append(scale.clone())
    return history, scales


def test_history_rolls_like_transformer_engine():
    recipe = FP8Recipe(recipe="delayed", amax_history_len=3)
    history, _ = _run_steps(recipe, [(1.0, 10.0, 100.0)])
    assert history[:, 0].tolist() == [0.0, 0.0, 1.0]  # row 0 rolled to the end, then zeroed
    history, _ = _run_steps(recipe, [(1.0, 1, 1), (2.0, 1, 1), (3.0, 1, 1)])
    assert history[:, 0].tolist() == [0.0, 2.0, 3.0]  # oldest dropped; most recent last
    history, _ = _run_steps(recipe, [(1.0, 1, 1), (2.0, 1, 1), (3.0, 1, 1), (4.0, 1, 1)])
    assert history[:, 0].tolist() == [0.0, 3.0, 4.0]


def test_max_uses_the_window_of_the_last_len_steps():
    recipe = FP8Recipe(recipe="delayed", amax_history_len=3, amax_compute_algo="max")
    steps = [(8.0, 1, 1), (2.0, 1, 1), (1.0, 1, 1), (0.5, 1, 1), (4.0, 1, 1)]
    _, scales = _run_steps(recipe, steps)
    # Scale available for step t+1 = 448 / max(amax of steps t-2..t).
    windows = [8.0, 8.0, 8.0, 2.0, 4.0]
    assert [s[0].item() for s in scales] == pytest.approx([448.0 / w for w in windows])


def test_most_recent_uses_only_the_last_step():
    recipe = FP8Recipe(recipe="delayed", amax_history_len=3, amax_compute_algo="most_recent")
    steps = [(8.0, 1, 1), (2.0, 1, 1), (1.0, 1, 1)]
    _, scales = _run_steps(recipe, steps)
    assert [s[0].item() for s in scales] == pytest.approx([56.0, 224.0, 448.0])


def test_per_slot_format_maxima_and_margin():
    recipe = FP8Recipe(recipe="delayed", amax_history_len=1, margin=1, format="hybrid")
    _, scales = _run_steps(recipe, [(2.0, 4.0, 8.0)])
    torch.testing.assert_close(scales[0], MAXES / torch.tensor([2.0, 4.0, 8.0]) / 2)
    e4m3 = FP8Recipe(recipe="delayed", amax_history_len=1, format="e4m3")
    _, scales = _run_steps(e4m3, [(1.0, 1.0, 1.0)])
    assert scales[0].tolist() == [448.0, 448.0, 448.0]  # grads in E4M3 too


def test_zero_or_non_finite_amax_keeps_the_previous_scale():
    recipe = FP8Recipe(recipe="delayed", amax_history_len=1)
    _, scales = _run_steps(recipe, [(2.0, 2.0, 2.0), (0.0, float("inf"), float("nan"))])
    assert torch.equal(scales[1], scales[0])
    _, scales = _run_steps(recipe, [(0.0, 0.0, 0.0)])
    assert scales[0].tolist() == [0.0, 0.0, 0.0]  # still unset: current scaling continues


def test_record_amax_accumulates_the_max_within_a_step():
    history, scale = new_delayed_buffers(2, torch.device("cpu"))
    for a in (3.0, 7.0, 5.0):  # e.g. three micro-batches
        record_amax(history, 0, torch.tensor(a))
    assert history[0, 0].item() == 7.0
    assert step_delayed_scaling([(history, scale)], FP8Recipe(recipe="delayed", amax_history_len=2)) == 1
    assert scale[0].item() == pytest.approx(64.0)
