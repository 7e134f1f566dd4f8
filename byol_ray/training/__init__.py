"""The per-worker pretraining loop (the same function in-process, in one Ray Train worker or in many),
its in-process session, the cross-worker replica check, and the step benchmark. No Ray, no MLflow."""
