"""MLflow models-from-code entry point for the allocator pyfunc (no pickled Python object)."""

import mlflow

from models.allocators.registry import AllocatorPyfunc

mlflow.models.set_model(AllocatorPyfunc())
