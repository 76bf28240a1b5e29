"""Distributed user-encoder pretraining (``recpipe pretrain --nproc N``).

Without processes: masked item prediction reads the item table through the embedding lookup
(what works sharded) and that is the weight itself; one process can train its tables with
the optimiser a CPU distributed run uses. With real ``torchrun`` ranks on CPU (gloo) over a
tiny workspace: ``recpipe pretrain --nproc 2`` completes, rank 0 logs and registers an
unsharded encoder that loads through the registry, writes the embedding table, and (masked
item prediction: no in-batch negatives, so the same objective per step) its final loss is
within ``MIP_LOSS_TOLERANCE`` of one process with the same seed.
"""

from __future__ import annotations

import mlflow
import polars as pl
import pytest
import torch

from models.distributed import shard_keys
from models.pretraining import PretrainConfig, UserSequences, pretrain
from models.user_encoder_registry import load_user_encoder
from models.user_encoders.encoder import (
    PaddedSequences,
    UserEncoderConfig,
    append_item_table_row,
    build_user_encoder,
)
from tests.conftest import run_json

pytestmark = pytest.mark.usefixtures("single_thread")

MIP_LOSS_TOLERANCE = 0.05
"""Largest difference of the final masked-item-prediction loss (cross-entropy over ~60
items) between 2 ranks and 1 process, same seed, 30 steps: the runs draw different users
and masks, so they differ by their sampling only. Measured over seeds 1-3: at most 0.006
(0.067 at --lr 0.02). A weak check: this log's items are uniform random, so the loss cannot
fall far below log 60 = 4.09 (it ends at ~4.07) whatever the machinery does; it catches a
broken run (a loss that diverges, or stays at a wrong scale), not a subtle bias."""
SMALL = ("--embedding-dim", "16", "--layers", "1", "--batch-size", "16")


def test_users_are_shared_out_whole_and_disjoint():
    users = [7, 3, 3, 9, 1, 7, 4]
    shares = [shard_keys(users, rank, 3).tolist() for rank in range(3)]
    assert shares == [[1, 7], [3, 9], [4]]


def test_the_item_table_read_through_the_lookup_is_the_weight():
    config = UserEncoderConfig(embedding_dim=8, n_items=12, n_behaviors=5, max_length=4)
    encoder = build_user_encoder(config, seed=0).eval()
    batch = PaddedSequences(torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8]]),
                            torch.tensor([[1, 2, 0, 0], [1, 1, 2, 3]]), torch.tensor([2, 4]))
    kjt = append_item_table_row(batch.to_kjt(), config.n_items + 1)
    assert kjt.stride() == 3
    hidden, valid, table = encoder.encode_tokens(batch.to_kjt(), with_item_table=True)
    plain_hidden, plain_valid = encoder.encode_tokens(batch.to_kjt())
    torch.testing.assert_close(table, encoder.item_table)
    torch.testing.assert_close(hidden, plain_hidden)
    assert torch.equal(valid, plain_valid)


def test_one_process_trains_its_tables_with_the_distributed_optimiser(optimiser_spy):
    """``embedding_optimizer="adagrad"``: the tables on Adagrad across both AdaptSSR stages,
    the rest on Adam (what a CPU distributed run does), and both move."""
    rng = torch.Generator().manual_seed(0)
    n, t = 24, 6
    lengths = torch.randint(2, t + 1, (n,), generator=rng)
    valid = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    items = torch.randint(2, 30, (n, t), generator=rng) * valid
    behaviors = torch.randint(1, 5, (n, t), generator=rng) * valid
    data = UserSequences(torch.arange(n).numpy(), items.numpy(), behaviors.numpy(),
                         lengths.numpy())
    config = PretrainConfig(method="adaptssr", steps=6, batch_size=8, progress=False,
                            embedding_optimizer="adagrad",
                            encoder=UserEncoderConfig(embedding_dim=8, n_items=30,
                                                      max_length=t))
    start = build_user_encoder(config.encoder, seed=0).state_dict()
    result = pretrain(data, config)
    end = result.encoder.state_dict()
    for name in ("embeddings.embeddings.t_item.weight", "transformer.layers.0.linear1.weight"):
        assert not torch.equal(start[name], end[name]), name
    assert result.distributed is None and len(result.history) == 1
    parameters = dict(result.encoder.named_parameters())
    table, dense = (id(parameters[name]) for name in (
        "embeddings.embeddings.t_item.weight", "transformer.layers.0.linear1.weight"))
    adagrad = [{id(p) for p in ps} for kind, ps in optimiser_spy if kind == "Adagrad"]
    adam = [{id(p) for p in ps} for kind, ps in optimiser_spy if kind == "Adam"]
    assert len(adagrad) == 1 and table in adagrad[0]  # one, kept across the two stages
    assert adam and all(table not in ids for ids in adam)
    assert all(dense in ids for ids in adam) and dense not in adagrad[0]


def assert_unsharded(state: dict, schema) -> None:
    """Plain tensors, the item and behaviour tables at full size (vocabulary + mask row)."""
    assert all(type(value) is torch.Tensor for value in state.values())
    assert state["embeddings.embeddings.t_item.weight"].shape == (
        schema.vocab_sizes["item_id"] + 1, 16)
    assert state["embeddings.embeddings.t_behavior.weight"].shape == (schema.n_behaviors + 1,
                                                                       16)


@pytest.mark.integration
def test_cli_nproc_pretrains_like_one_process_and_registers_an_unsharded_encoder(workspace,
                                                                                 capsys):
    common = ["pretrain", "--home", str(workspace.root), "--method", "mip", "--steps", "30",
              "--seed", "1", "--json", *SMALL]
    single = run_json(capsys, *common, "--no-register", "--embedding-optimizer", "adagrad")
    multi = run_json(capsys, *common, "--nproc", "2")

    assert set(multi) == set(single) | {"distributed"}
    info = multi["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["per_rank_batch"] == 8
    assert set(info["plan"]) == {"embeddings.t_item", "embeddings.t_behavior"}
    assert multi["train_windows"] == single["train_windows"]  # every user's windows, once
    assert multi["users_embedded"] == single["users_embedded"] == 40
    assert multi["final"]["loss"] == pytest.approx(single["final"]["loss"],
                                                   abs=MIP_LOSS_TOLERANCE)

    registered = multi["registered"]
    assert registered["name"] == "recpipe-user-encoder"
    mlflow.set_tracking_uri(workspace.tracking_uri)
    loaded = load_user_encoder(f"models:/{registered['name']}/{registered['version']}")
    assert_unsharded(loaded.encoder.state_dict(), loaded.schema)
    table = pl.read_parquet(multi["embeddings_path"])
    assert table.get_column("model_version").unique().to_list() == [registered["version"]]
    assert table.get_column("embedding").list.len().unique().to_list() == [16]
    params = mlflow.MlflowClient().get_run(multi["run_id"]).data.params
    assert params["world_size"] == "2"
    assert params["embedding_optimizer"] == "adagrad"
    assert params["distributed.plan.embeddings.t_item"] in ("table_wise", "column_wise")


@pytest.mark.slow
@pytest.mark.integration
def test_cli_nproc_adaptssr_column_wise_completes_and_serves(workspace, capsys):
    """AdaptSSR (MIP warm start, then in-batch negatives per rank) with column-wise tables:
    completes, and the registered encoder embeds users like any other."""
    multi = run_json(capsys, "pretrain", "--home", str(workspace.root), "--method", "adaptssr",
                 "--steps", "10", "--seed", "2", "--json", *SMALL, "--nproc", "2",
                 "--sharding", "column_wise")
    plan = multi["distributed"]["plan"]
    assert {spec["sharding_type"] for spec in plan.values()} == {"column_wise"}
    assert plan["embeddings.t_item"]["ranks"] == [0, 1]
    assert {"acc_pos_semi", "acc_semi_neg", "lambda"} <= set(multi["final"])
    mlflow.set_tracking_uri(workspace.tracking_uri)
    loaded = load_user_encoder(multi["model_uri"])
    assert_unsharded(loaded.encoder.state_dict(), loaded.schema)
    vectors = pl.read_parquet(multi["embeddings_path"]).get_column("embedding").to_list()
    assert len(vectors) == 40 and all(len(v) == 16 for v in vectors)
