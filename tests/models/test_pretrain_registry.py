"""Pretrain → log → register → load back from ``models:/recpipe-user-encoder@champion``
(a real MLflow SQLite store in tmp_path) gives identical embeddings, through every path:
the raw encoder, the pyfunc on raw histories, and the ranker adapter."""

from __future__ import annotations

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from models.batch import ExampleArrays
from models.pretraining import PretrainConfig, UserSequences, embed, pretrain
from models.registry import ensure_experiment
from models.user_encoder_registry import (
    CHAMPION_URI,
    LoadedUserEncoder,
    load_pretrained_user_encoder,
    load_user_encoder,
    log_user_encoder,
    register_user_encoder,
)
from models.user_encoders import UserEncoderConfig


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield tmp_path
    mlflow.set_tracking_uri(previous)


@pytest.mark.integration
def test_registered_encoder_reproduces_the_embeddings(tiny_examples, tracking):
    torch.set_num_threads(1)
    examples, schema, vocab = tiny_examples
    data = UserSequences.from_frame(examples, schema.history_length, min_length=2)
    encoder_config = UserEncoderConfig(embedding_dim=8, n_layers=1, n_heads=2, ffn_dim=16)
    config = PretrainConfig(method="adaptssr", steps=4, batch_size=16, log_every=2,
                            progress=False, encoder=encoder_config).for_schema(schema)
    result = pretrain(data, config)
    expected = embed(result.encoder, data)
    loaded = LoadedUserEncoder(result.encoder, config, schema, vocab)
    experiment = ensure_experiment("test-user-encoders", tracking / "artifacts")
    with mlflow.start_run(experiment_id=experiment) as run:
        uri = log_user_encoder(loaded, examples)
    registered = register_user_encoder(uri, run.info.run_id)
    assert registered == {"name": "recpipe-user-encoder", "version": 1,
                          "aliases": ["challenger", "champion"]}

    back = load_user_encoder(CHAMPION_URI)
    assert back.pretrain == config and back.config == config.encoder
    np.testing.assert_array_equal(embed(back.encoder, data), expected)

    # the pyfunc on raw histories (raw item ids, lists) equals the encoded path
    latest = UserSequences.from_frame(examples, schema.history_length, latest_only=True)
    rows = (examples.sort("user_id", "ts").group_by("user_id", maintain_order=True).last()
            .select("hist_item_id", "hist_behavior"))
    predicted = mlflow.pyfunc.load_model(CHAMPION_URI).predict(rows.to_pandas())
    np.testing.assert_allclose(predicted.to_numpy(), embed(result.encoder, latest), atol=1e-6)

    # the ranker adapter reads RankerBatch histories and gives the same vectors
    adapter = load_pretrained_user_encoder(CHAMPION_URI, ranker_vocab=vocab, freeze=True)
    arrays = ExampleArrays.from_frame(examples, schema)
    batch = arrays.batch(np.arange(64))
    sequences = UserSequences.from_rows(examples.head(64), schema.history_length)
    with torch.no_grad():
        np.testing.assert_allclose(adapter(batch).numpy(), embed(result.encoder, sequences),
                                   atol=1e-6)


def test_embed_raw_maps_unknown_items_to_the_unknown_index(tiny_examples):
    examples, schema, vocab = tiny_examples
    config = PretrainConfig(method="none", encoder=UserEncoderConfig(
        embedding_dim=8, n_layers=1, n_heads=2, ffn_dim=16)).for_schema(schema)
    encoder = pretrain(UserSequences.from_frame(examples, schema.history_length), config).encoder
    loaded = LoadedUserEncoder(encoder, config, schema, vocab)
    known = vocab.ids["item_id"][0]
    rows = pl.DataFrame({"hist_item_id": [[known, 10**9]], "hist_behavior": [[2, 3]]})
    unknown = pl.DataFrame({"hist_item_id": [[known, 10**9 + 1]], "hist_behavior": [[2, 3]]})
    np.testing.assert_array_equal(loaded.embed_raw(rows), loaded.embed_raw(unknown))
