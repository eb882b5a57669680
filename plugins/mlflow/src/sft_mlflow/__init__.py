"""sft-mlflow: records sft runs in MLflow (`logging.trackers: [mlflow]`).

$ pip install -e plugins/mlflow
$ mlflow ui --backend-store-uri sqlite:///runs/NAME/mlflow.db   # needs the full `mlflow`
"""
