"""Every MLflow call of the project: the run writer (`tracker`), store URIs and reachability (`uri`), the
client and experiments (`client`), run searches (`runs`), the encoder as an MLflow model (`models`), the
local tracking server (`server`) and the sweep reports (`report`). No other package imports mlflow."""
