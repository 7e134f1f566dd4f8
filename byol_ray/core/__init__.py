"""BYOL itself: the loss, the target's EMA and tau schedule, LARS and the lr schedule, the networks, one
training replica (the engine) and its checkpoint state. Knows nothing of Ray or MLflow."""
