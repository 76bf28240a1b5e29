"""The user encoder in MLflow: log it as a pyfunc with everything needed to rebuild it, load
it back (as the raw encoder, or as the ranker's ``PretrainedUserEncoder``).

Artifacts of a logged encoder: ``state_dict.pt``, ``encoder_config.json``
(``UserEncoderConfig``), ``pretrain_config.json`` (the whole ``PretrainConfig``),
``schema.json`` and ``vocab.json`` (the item vocabulary its indices refer to). ``predict``
takes raw histories (``hist_item_id`` raw item ids, ``hist_behavior`` codes; lists per row,
oldest first) and returns one user vector per row, so ``models:/recpipe-user-encoder@champion``
needs nothing else. Registration reuses ``models.registry.register`` (alias challenger;
champion when there is none yet).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import torch

from features.schema import SEQUENCE_BEHAVIOR_FEATURE, SEQUENCE_ITEM_FEATURE, ExampleSchema
from features.vocab import Vocabulary
from models.pretraining import ITEMS_COLUMN, PretrainConfig, UserSequences, embed
from models.registry import CHAMPION, load_pyfunc, register, runtime_requirements
from models.user_encoders.adapter import PretrainedUserEncoder
from models.user_encoders.encoder import TransformerUserEncoder, UserEncoderConfig

USER_ENCODER_MODEL_NAME = "recpipe-user-encoder"
CHAMPION_URI = f"models:/{USER_ENCODER_MODEL_NAME}@{CHAMPION}"
HISTORY_COLUMNS: tuple[str, str] = (SEQUENCE_ITEM_FEATURE, SEQUENCE_BEHAVIOR_FEATURE)


@dataclass
class LoadedUserEncoder:
    """A user encoder rebuilt from its artifacts, ready to embed histories."""

    encoder: TransformerUserEncoder
    pretrain: PretrainConfig
    schema: ExampleSchema
    vocab: Vocabulary

    @property
    def config(self) -> UserEncoderConfig:
        return self.encoder.config

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.encoder.state_dict(), directory / "state_dict.pt")
        (directory / "encoder_config.json").write_text(json.dumps(self.config.to_dict()))
        (directory / "pretrain_config.json").write_text(json.dumps(self.pretrain.to_dict()))
        (directory / "schema.json").write_text(json.dumps(self.schema.to_dict()))
        self.vocab.save(directory / "vocab.json")

    @classmethod
    def from_dir(cls, directory: Path) -> LoadedUserEncoder:
        config = UserEncoderConfig.from_dict(
            json.loads((directory / "encoder_config.json").read_text()))
        encoder = TransformerUserEncoder(config)
        state = torch.load(directory / "state_dict.pt", map_location="cpu", weights_only=True)
        encoder.load_state_dict(state)
        encoder.eval()
        return cls(
            encoder=encoder,
            pretrain=PretrainConfig.from_dict(
                json.loads((directory / "pretrain_config.json").read_text())),
            schema=ExampleSchema.from_dict(json.loads((directory / "schema.json").read_text())),
            vocab=Vocabulary.load(directory / "vocab.json"),
        )

    def embed_raw(self, rows: pl.DataFrame) -> np.ndarray:
        """(N, D) user vectors of raw histories (``HISTORY_COLUMNS``: raw item ids and
        behaviour codes, oldest first)."""
        length = self.config.max_length
        frame = rows.select(
            pl.lit(0, dtype=pl.Int64).alias("user_id"),
            pl.int_range(pl.len(), dtype=pl.Int64).alias("ts"),
            pl.col(SEQUENCE_ITEM_FEATURE).cast(pl.List(pl.Int64)).list.tail(length)
            .list.eval(self.vocab.encode(pl.element(), "item_id")).alias(ITEMS_COLUMN),
            pl.col(SEQUENCE_BEHAVIOR_FEATURE).cast(pl.List(pl.Int64)).list.tail(length),
        )
        return embed(self.encoder, UserSequences.from_rows(frame, length))

    def adapter(self, ranker_vocab: Vocabulary | None = None,
                freeze: bool = True) -> PretrainedUserEncoder:
        """This encoder as a ranker's ``user_encoder`` (item indices of ``ranker_vocab``)."""
        return PretrainedUserEncoder.for_vocabularies(self.encoder, self.vocab, ranker_vocab,
                                                      freeze=freeze)


class UserEncoderPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: raw histories in, one row of D floats (``u0`` … ``u{D-1}``) out."""

    def load_context(self, context) -> None:  # noqa: ANN001 (MLflow's PythonModelContext)
        self.loaded = LoadedUserEncoder.from_dir(Path(context.artifacts["user_encoder"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        rows = pl.from_pandas(model_input[list(HISTORY_COLUMNS)])
        vectors = self.loaded.embed_raw(rows)
        return pd.DataFrame(vectors, columns=[f"u{i}" for i in range(vectors.shape[1])])


def input_example(rows: pl.DataFrame, n: int = 5) -> pd.DataFrame:
    """A few raw histories (lists of Int64) as the pyfunc input example."""
    return rows.select(pl.col(name).cast(pl.List(pl.Int64)) for name in HISTORY_COLUMNS
                       ).head(n).to_pandas()


def log_user_encoder(loaded: LoadedUserEncoder, example_rows: pl.DataFrame) -> str:
    """Log ``loaded`` into the active run as ``user_encoder``; ``example_rows`` (raw
    ``HISTORY_COLUMNS``) give the input example and signature. Returns the model URI."""
    entry = Path(__file__).with_name("user_encoders") / "pyfunc_entry.py"
    with tempfile.TemporaryDirectory() as tmp:
        loaded.save(Path(tmp))
        info = mlflow.pyfunc.log_model(
            name="user_encoder",
            python_model=str(entry),
            artifacts={"user_encoder": tmp},
            pip_requirements=runtime_requirements(),
            input_example=input_example(example_rows),
        )
    return info.model_uri


def register_user_encoder(model_uri: str, run_id: str) -> dict:
    """Register as ``recpipe-user-encoder`` (alias challenger; champion if none)."""
    return register(model_uri, USER_ENCODER_MODEL_NAME, {"run_id": run_id})


def load_user_encoder(model_uri: str = CHAMPION_URI) -> LoadedUserEncoder:
    """Rebuild a logged user encoder from ``models:/name@alias`` (or any model URI)."""
    return load_pyfunc(model_uri).unwrap_python_model().loaded


def load_pretrained_user_encoder(
    model_uri: str = CHAMPION_URI, ranker_vocab: Vocabulary | None = None,
    freeze: bool = True,
) -> PretrainedUserEncoder:
    """The registered encoder as a ranker's ``user_encoder``: pass the ranker's vocabulary
    so its item indices are translated (None: the ranker uses the encoder's vocabulary)."""
    return load_user_encoder(model_uri).adapter(ranker_vocab, freeze=freeze)
