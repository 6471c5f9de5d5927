"""Launching runs on clusters (a front door): SLURM batch scripts and their submission
(`sbatch`, `nemotron-train sbatch` and the SLURM path of `nemotron-train ablate`), and the
`python -m launch.slurm_env` entry point of a SLURM task. The library parts they use live
below: the SLURM -> rank mapping in `nemotron_train.distributed.slurm`, the graceful-stop
protocol in `nemotron_train.training.stop`, the ablation plan in `nemotron_train.ablation.plan`."""
