"""Workarounds for megatron-core 0.16's optimizer checkpointing without apex/TE.

Without apex or Transformer Engine, megatron-core wraps torch's AdamW, and its distributed
optimizer

(a) reads AdamW's per-parameter state (`step` included) while building the load plan, but
    that state only exists after a first step: `materialize_optimizer_state` creates it with
    a zero-gradient, zero-learning-rate step before a save or load;
(b) copies every inner-state key of a parameter from the checkpoint, including `step`, which
    its reshardable format does not store: `install_mcore_fixes` patches
    `DistributedOptimizer._set_main_param_and_optimizer_states` to copy the stored keys only;
(c) hands one shared `step` tensor to every parameter on load, which AdamW then increments
    once per parameter per step: `unshare_step_tensors` gives each parameter its own copy.

With FusedAdam (apex/TE) none of this applies and the patch is not installed.

`install_mcore_fixes()` is called explicitly at setup (the Trainer, single-process
conversion); it is idempotent. (a) and (c) act on one optimizer and are called by the
Checkpointer around its saves and loads.
"""

from __future__ import annotations

import torch

_MARK = "_nemotron_patched"


def install_mcore_fixes() -> None:
    """Install the megatron-core 0.16 patches (idempotent; a no-op with apex/TE)."""
    _patch_torch_adam_state_load()


def _patch_torch_adam_state_load() -> None:
    """mcore 0.16 copies every inner-state key of a parameter from the loaded checkpoint,
    including torch AdamW's `step`, which its reshardable format does not store (it keeps
    `step` in the param groups and restores it separately). Copy only the stored keys."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE or getattr(dopt.DistributedOptimizer, _MARK, False):
        return
    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    setattr(dopt.DistributedOptimizer, _MARK, True)


def _torch_optimizers(optimizer):
    """The torch optimizers inside an mcore (possibly chained) optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield inner


def materialize_optimizer_state(optimizer) -> None:
    """Give an unstepped torch optimizer its per-parameter state before a save or load.

    Without apex/TE, mcore wraps torch's AdamW, whose state (and `step`) only exists after a
    first step; mcore's checkpoint mapping reads it while building the load plan. A step with
    zero gradients and lr 0 creates it without changing any parameter; the load overwrites it."""
    for inner in _torch_optimizers(optimizer):
        if len(inner.state) > 0:
            continue
        lrs = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for group, lr in zip(inner.param_groups, lrs):
            group["lr"] = lr


def unshare_step_tensors(optimizer) -> None:
    """mcore hands one `step` tensor to every parameter's torch-AdamW state on load; AdamW
    then increments the shared tensor once per parameter per step, which breaks bias
    correction. Give each parameter its own copy."""
    for inner in _torch_optimizers(optimizer):
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
