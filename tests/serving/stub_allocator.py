"""A stand-in live-stream allocator (an MLflow models-from-code file) that follows the
contract of ``serving.allocation``: one state row per request in, P(insert) out. It reads a
session field, P = min(1, request_index / 10), so a request without it makes it fail."""

import mlflow
import pandas as pd


class StubAllocator(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        probability = (model_input["request_index"].astype(float) / 10.0).clip(0.0, 1.0)
        return pd.DataFrame({"probability": probability})


mlflow.models.set_model(StubAllocator())
