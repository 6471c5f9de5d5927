"""Precision ablations (`nemotron-train ablate`) and run comparison reports (`compare`)."""

from nemotron_train.ablation.plan import ARMS, AblationPlan, AblationRun, build_plan, parse_arms
from nemotron_train.ablation.report import compare_runs

__all__ = ["ARMS", "AblationPlan", "AblationRun", "build_plan", "compare_runs", "parse_arms"]
