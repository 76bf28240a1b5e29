"""Distributed ranker training (``models.distributed``, ``recpipe train-ranker --nproc N``).

The unit tests check the data sharding and optimiser rules without processes. The
integration tests launch real ``torchrun`` ranks on CPU (gloo) over a tiny workspace:

- with shuffling off, 2 ranks with column-wise sharded tables compute what one process
  computes: the same metrics and weights up to float summation order (``EXACT``);
- the CLI default (shuffled shards, planner's choice of sharding) trains to metrics within
  ``*_TOLERANCE`` of a single-process run with the same seed, and
  the model it registers is unsharded and serves like any other (slow: ~60 s).
"""

from __future__ import annotations

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from flows.cli import ranker_rank_job
from flows.steps import (
    RankerJob,
    train_ranker_step,
)
from flows.torchrun import launch
from flows.workspace import Workspace
from models.distributed import (
    Rank,
    ReplicasDivergedError,
    ShardingConfig,
    check_embedding_optimizer,
    full_state_dict,
    read_shard,
    shard_rows,
)
from models.losses import MultiTaskLoss
from models.rankers import RankerConfig, build_ranker
from models.registry import load_ranker
from models.training import TrainConfig, make_optimisers
from tests.conftest import run_json, simulated_workspace

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"n_experts": 2, "expert_hidden": (16, 8), "tower_hidden": (4,)}
EXACT = 1e-3
"""Largest metric or weight difference allowed between 2 ranks and 1 process doing the same
steps (measured: 2e-5 on metrics, 7e-5 on weights after 20 Adam / Adagrad steps: float
summation order, which Adam's normalisation amplifies where gradients are near zero)."""
LOGLOSS_TOLERANCE = 0.02
"""Largest logloss difference allowed between a 2-rank run (each rank shuffles its shard)
and one process (global shuffle), same seed and optimisers, ~5k simulated training rows:
measured up to 0.010 over seeds 1-3, about what one process moves between seeds (0.008)."""
RMSE_TOLERANCE = 0.03
"""The same for watch time's RMSE of log seconds (~1.5; measured up to 0.014)."""
AUC_TOLERANCE = 0.03
"""The same for the click AUC (measured up to 0.016; seed-to-seed spread of one process
0.025). The rarer labels' AUCs (like, follow: a few dozen positives) move by up to 0.1
between shuffles and are not compared."""


@pytest.mark.parametrize(("n_rows", "world"), [(10, 2), (11, 3), (5, 5), (7, 1)])
def test_shards_are_disjoint_equal_and_leave_out_only_the_remainder(n_rows, world):
    shards = [shard_rows(n_rows, rank, world) for rank in range(world)]
    assert {len(shard) for shard in shards} == {n_rows // world}
    together = np.sort(np.concatenate(shards))
    assert together.tolist() == list(range(n_rows // world * world))


def test_a_rank_reads_only_its_rows_of_the_parquet(tmp_path):
    path = tmp_path / "rows.parquet"
    pl.DataFrame({"row": np.arange(11)}).write_parquet(path)
    assert read_shard(path, 1, 3).get_column("row").to_list() == [1, 4, 7]
    assert read_shard(path, 2, 3).get_column("row").to_list() == [2, 5, 8]
    with pytest.raises(ValueError, match="fewer than the 20 ranks"):
        read_shard(path, 0, 20)


def test_the_ranks_step_batches_together_are_the_single_process_batch():
    """Global batch semantics: W ranks taking ``batch_size // W`` rows of their interleaved
    shards (unshuffled) cover exactly the rows one process takes at the same step."""
    n_rows, world, batch_size = 103, 4, 16
    per_rank = batch_size // world
    shards = [shard_rows(n_rows, rank, world) for rank in range(world)]
    kept = n_rows // world * world
    for step in range(-(-len(shards[0]) // per_rank)):
        union = np.sort(np.concatenate([s[step * per_rank:(step + 1) * per_rank]
                                        for s in shards]))
        expected = np.arange(step * batch_size, min((step + 1) * batch_size, kept))
        assert union.tolist() == expected.tolist()


def _save_after_one_rank_stepped_alone(rank: int, init_file: str, outcomes) -> None:
    """A gloo rank: gather a plain model whose replicas agree, then one whose bias moved on
    rank 1 only (a step on unaveraged gradients); report what each gather did."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    me = Rank(rank, 2, rank, torch.device("cpu"), "gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    try:
        gathered = full_state_dict(model, me)
        outcomes.put((rank, "agreed", sorted(gathered) if gathered else None))
        if rank == 1:
            with torch.no_grad():
                model.bias[0] += 1e-6
        try:
            full_state_dict(model, me)
            outcomes.put((rank, "saved", None))
        except ReplicasDivergedError as error:
            outcomes.put((rank, "refused", str(error)))
        if rank == 0:  # a NaN is not a disagreement: it is divergence, said as such
            with torch.no_grad():
                model.weight[0, 0] = float("nan")
        try:
            full_state_dict(model, me)
        except FloatingPointError as error:
            outcomes.put((rank, "diverged", str(error)))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_a_model_whose_replicas_disagree_is_not_saved(tmp_path):
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    outcomes = context.Queue()
    processes = [context.Process(target=_save_after_one_rank_stepped_alone,
                                 args=(rank, str(tmp_path / "init"), outcomes))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    reports = sorted(outcomes.get(timeout=5) for _ in range(6))
    assert reports[0] == (0, "agreed", ["bias", "weight"]) and reports[3][:2] == (1, "agreed")
    for rank, outcome, message in (reports[2], reports[5]):
        assert outcome == "refused", (rank, outcome)  # on both ranks: no rank is left waiting
        assert "['bias']" in message and "not averaged" in message
    for rank, outcome, message in (reports[1], reports[4]):
        assert outcome == "diverged", (rank, outcome)
        assert "non-finite parameters" in message


def test_cpu_ranks_need_an_embedding_optimiser_the_fused_cpu_kernel_has():
    with pytest.raises(ValueError, match="no fused CPU kernel"):
        check_embedding_optimizer("adam", torch.device("cpu"))
    check_embedding_optimizer("adagrad", torch.device("cpu"))
    check_embedding_optimizer("adam", torch.device("cuda"))
    with pytest.raises(ValueError, match="sharding_types"):
        ShardingConfig(sharding_types=("row_wise",))


def test_multi_node_passes_the_rendezvous_options_to_torchrun():
    from flows.cli import UserError, build_parser
    from flows.torchrun import torchrun_rendezvous

    def options(*argv: str) -> list[str]:
        return torchrun_rendezvous(build_parser().parse_args(["train-ranker", *argv]))

    assert options("--nproc", "2") == ["--standalone"]
    assert options("--nproc", "8", "--nnodes", "2", "--rdzv-endpoint", "node0:29500",
                   "--rdzv-id", "job7") == [
        "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500",
        "--rdzv-id", "job7"]
    assert options("--nnodes", "2", "--rdzv-endpoint", "node0:29500", "--rdzv-backend",
                   "static", "--node-rank", "1")[-2:] == ["--node-rank", "1"]
    with pytest.raises(UserError, match="--rdzv-endpoint"):
        options("--nproc", "8", "--nnodes", "2")


def test_one_process_can_train_its_tables_with_the_distributed_optimiser(tiny_examples):
    """``embedding_optimizer`` also applies to a single process: tables on Adagrad, the
    rest on Adam (what a CPU distributed run does), so the two are comparable."""
    _, schema, _ = tiny_examples
    model = build_ranker(schema, RankerConfig(**SMALL))
    dense, tables = make_optimisers(model, MultiTaskLoss(schema.tasks),
                                    TrainConfig(embedding_optimizer="adagrad"))
    assert isinstance(dense, torch.optim.Adam) and isinstance(tables, torch.optim.Adagrad)
    table_ids = {id(p) for p in model.encoder.pooled.parameters()}
    table_ids |= {id(p) for p in model.encoder.sequence.parameters()}
    assert {id(p) for g in tables.param_groups for p in g["params"]} == table_ids
    assert not table_ids & {id(p) for g in dense.param_groups for p in g["params"]}


def assert_unsharded(state: dict, schema) -> None:
    """Plain tensors, every table at its full vocabulary size."""
    assert all(type(value) is torch.Tensor for value in state.values())
    assert state["encoder.sequence.embeddings.t_item.weight"].shape == (
        schema.vocab_sizes["item_id"], 16)
    assert state["encoder.pooled.embedding_bags.t_user_id.weight"].shape == (
        schema.vocab_sizes["user_id"], 16)


@pytest.mark.integration
def test_two_cpu_ranks_compute_what_one_process_computes(workspace):
    job = RankerJob(ranker={"arch": "mmoe", **SMALL},
                    train={"epochs": 2, "batch_size": 64, "shuffle": False, "seed": 3,
                           "embedding_optimizer": "adagrad", "progress": False})
    rows = pl.scan_parquet(workspace.examples / "train.parquet").select(pl.len()).collect()
    assert rows.item() % 2 == 0  # so both runs see every row
    single = train_ranker_step(workspace, job)
    multi = launch(workspace, "train-ranker", ranker_rank_job(job, "column_wise"), nproc=2)

    plan = multi["distributed"]["plan"]
    assert multi["distributed"]["world_size"] == 2 and multi["distributed"]["backend"] == "gloo"
    assert {spec["sharding_type"] for spec in plan.values()} == {"column_wise"}
    item = plan["encoder.sequence.t_item"]
    assert item["shards"] == [[62, 8], [62, 8]]  # cut in two column slices
    assert any(spec["ranks"] == [0, 1] for spec in plan.values())  # tables span ranks
    gaps = {(split, task, name): abs(multi["metrics"][split][task][name] - value)
            for split in ("valid", "test")
            for task, values in single["metrics"][split].items()
            for name, value in values.items()}
    assert max(gaps.values()) < EXACT, max(gaps, key=gaps.get)

    one, two = load_ranker(single["model_uri"]), load_ranker(multi["model_uri"])
    state = two.model.state_dict()
    assert_unsharded(state, two.schema)
    weight_gaps = {name: float((state[name].float() - value.float()).abs().max())
                   for name, value in one.model.state_dict().items()}
    assert max(weight_gaps.values()) < EXACT, max(weight_gaps, key=weight_gaps.get)
    client = mlflow.MlflowClient(workspace.tracking_uri)
    run = client.get_run(multi["run_id"])
    assert run.data.params["world_size"] == "2"
    assert run.data.params["distributed.plan.encoder.sequence.t_item"] == "column_wise"
    assert run.data.params["rows_train"] == str(rows.item())
    assert "valid_click_auc" in run.data.metrics and "train_loss" in run.data.metrics


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Workspace:
    """A simulated world with learnable signal (the parity log above has too little for
    metric comparisons to mean anything): ~5k training rows."""
    return simulated_workspace(tmp_path_factory.mktemp("simulated"))


@pytest.mark.slow
@pytest.mark.integration
def test_cli_nproc_trains_like_one_process_and_registers_a_model_that_serves(simulated,
                                                                             capsys):
    """``recpipe train-ranker --nproc 2`` with its defaults (each rank shuffles its own
    shard; tables on Adagrad, CPU) against one process with the same seed and embedding
    optimiser (global shuffle): the runs differ by their shuffles only, so their metrics
    agree within the ``*_TOLERANCE``s."""
    from serving.reloader import load_ranker_version
    from serving.scorer import Scorer

    common = ["train-ranker", "--home", str(simulated.root), "--arch", "mmoe",
              "--epochs", "2", "--batch-size", "64", "--seed", "1", "--json"]
    single = run_json(capsys, *common, "--no-register", "--embedding-optimizer", "adagrad")
    multi = run_json(capsys, *common, "--nproc", "2")

    assert set(multi) == set(single) | {"registered", "distributed"}
    assert multi["distributed"]["per_rank_batch"] == 32
    for split in ("valid", "test"):
        one, two = single["metrics"][split], multi["metrics"][split]
        for task in ("click", "like", "follow", "long_view"):
            assert two[task]["logloss"] == pytest.approx(one[task]["logloss"],
                                                         abs=LOGLOSS_TOLERANCE), (split, task)
        assert two["click"]["auc"] == pytest.approx(one["click"]["auc"], abs=AUC_TOLERANCE)
        assert two["watch_time"]["rmse_log"] == pytest.approx(one["watch_time"]["rmse_log"],
                                                              abs=RMSE_TOLERANCE)

    mlflow.set_tracking_uri(simulated.tracking_uri)
    registered = multi["registered"]
    assert registered["name"] == "recpipe-ranker"
    ranker = load_ranker_version(registered["name"], registered["version"])
    assert_unsharded(ranker.model.state_dict(), ranker.schema)
    raw = pl.read_parquet(simulated.examples / "test.parquet", n_rows=20)
    _, predictions = Scorer(ranker).predict_raw(raw)
    assert predictions.shape == (20, len(ranker.schema.tasks))
    assert np.isfinite(predictions).all()
    params = mlflow.MlflowClient().get_run(multi["run_id"]).data.params
    assert params["train.embedding_optimizer"] == "adagrad"
    assert params["world_size"] == "2"


def test_the_global_batch_must_split_evenly_over_the_ranks():
    from models.distributed import per_rank_batch

    assert per_rank_batch(512, 2) == 256
    for batch_size, world in ((512, 3), (3, 2), (2, 2)):  # 510 in all; 1 row per rank
        with pytest.raises(ValueError, match="does not split into"):
            per_rank_batch(batch_size, world)
