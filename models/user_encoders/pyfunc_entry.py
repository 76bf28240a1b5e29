"""MLflow models-from-code entry point for the user-encoder pyfunc (no pickled object)."""

import mlflow

from models.user_encoder_registry import UserEncoderPyfunc

mlflow.models.set_model(UserEncoderPyfunc())
