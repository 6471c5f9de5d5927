"""The distributed layer: process groups (`groups`, the only reader of megatron-core's
global `parallel_state`) and the SLURM -> rank mapping (`slurm`, pure Python: a SLURM task
imports it before torch). Import the submodule you need; this package imports nothing."""
