"""MLflow models-from-code entry point for the ranker pyfunc (no pickled Python object)."""

import mlflow

from models.registry import RankerPyfunc

mlflow.models.set_model(RankerPyfunc())
