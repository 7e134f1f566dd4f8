"""Images in: dataset readers (local files only), BYOL's view distributions, the streaming pipeline for
folders too big for memory, and the transfer datasets. Knows nothing of models, Ray or MLflow."""
