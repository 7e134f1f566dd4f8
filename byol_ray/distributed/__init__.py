"""Ray, in one package: the cluster (address, connection, resources), preflight checks, the Ray Train
driver and its worker session, the end-of-run results, and Ray Tune ablation sweeps."""
