"""Launching runs on clusters: SLURM batch scripts (`sbatch`), the SLURM -> torch.distributed
environment (`slurm_env`), and the graceful-stop protocol shared with the trainer (`signals`)."""
