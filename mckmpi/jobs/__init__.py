"""Jobs: how ranks are launched (launchers), Slurm from Python (slurm), study plans (study)."""
