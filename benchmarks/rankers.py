"""Multi-task rankers side by side: our five architectures against DeepCTR-Torch's MMOE and PLE.

    make bench-rankers        # = .venv-bench/bin/python benchmarks/rankers.py, ~40 min
    .venv-bench/bin/python benchmarks/rankers.py --data simulator --seeds 0 --epochs 1

Needs the benchmark environment (``make bench-env``: the project's pins plus
``deepctr-torch==0.3.0``; the product venv never has DeepCTR). Run from the product venv it
benchmarks ours only and says so.

Every contender gets the same examples (built once per dataset by the product's own
``simulate → ingest → features`` steps: same time split, same vocabularies, same history
length), the same embedding dim, expert and tower widths, epochs, batch size, learning rate,
seed and torch thread count, and runs alone in a fresh subprocess (``OMP_NUM_THREADS`` =
threads and ``OMP_WAIT_POLICY=PASSIVE`` for all, so that two OpenMP threads spin-waiting on
a shared, loaded machine do not decide the race). DeepCTR is used the way its users use it:
its feature columns (the history as a mean-pooled ``VarLenSparseFeat`` sharing the item
table, as it has no target attention in MMOE/PLE), ``compile`` + ``fit`` + ``predict``, with
linear gates like ours and its L2 terms set to 0 (we train without regularisation either).

Measured: per task AUC and GAUC on the test split (and, on the simulator, the oracle AUC of
the true probabilities and the ratio (AUC − 0.5) / (oracle AUC − 0.5)); training examples/s
(best epoch of the run; wall clock), CPU seconds per 1k training examples (process CPU time,
which contention inflates much less than wall time), inference examples/s (best of 3 passes
over the test split), peak RSS and its growth over the loaded data, parameters, and for our
models the largest fraction of zero activations of any expert. With several seeds the table
shows means (AUC ± std over seeds).

Data: the simulator (default 2,000 users × 7 days, last day test, the one before valid) and
the KuaiRand-1K random-exposure log at ``../shared/data/kuairand-1k/`` when present (time
split: last 3 days test, 2 before valid; ``follow`` has 8 positives there and is left out of
the KuaiRand means). Results go to stdout, to the marked rankers section of
``benchmarks/README.md`` (unless ``--no-readme``) and to one MLflow run in experiment
``recpipe-benchmarks`` of the workspace (``$RECPIPE_HOME`` or ``./workspace``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this file is benchmarks/rankers.py: never shadow the package

import numpy as np  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- rankers-benchmark:begin -->", "<!-- rankers-benchmark:end -->"
KUAIRAND = ROOT.parent / "shared" / "data" / "kuairand-1k" / "log_random_4_22_to_5_08_1k.csv"
OURS = ("shared_bottom", "mmoe", "cgc", "ple", "home")
SAME_FEATURES = {"mmoe_meanpool": "mmoe", "ple_meanpool": "ple"}
"""Ours with DeepCTR's features (``history_pooling="mean"``: the history mean-pooled, no target
attention), the like-for-like rows for the speed comparison."""
DEEPCTR = ("deepctr_mmoe", "deepctr_ple")
EVALUATED = {"simulator": ("click", "like", "follow", "long_view"),
             "kuairand": ("click", "like", "long_view")}
"""Binary tasks averaged into the mean AUC / GAUC per dataset."""
EXPERIMENT = "recpipe-benchmarks"
DEEPCTR_PLE_EXPERTS = 2
"""Shared and task-specific experts per level of DeepCTR's PLE. DeepCTR-Torch 0.3.0 builds
``specific_expert_num`` shared experts instead of ``shared_expert_num`` (``ple.py``:
``multi_module_list(self.num_levels, 1, self.specific_expert_num, …)``), so any
shared ≠ specific raises IndexError in forward; 2 + 2 per task (12 experts a level) is the
nearest it can build to our 4 + 1 per task (9 a level)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["simulator", "kuairand"],
                        choices=["simulator", "kuairand"], help="datasets (default both)")
    parser.add_argument("--contenders", nargs="+", default=[*OURS, *SAME_FEATURES, *DEEPCTR],
                        choices=[*OURS, *SAME_FEATURES, *DEEPCTR])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, all")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, all")
    parser.add_argument("--users", type=int, default=2000, help="simulator users")
    parser.add_argument("--days", type=int, default=7, help="simulator days")
    parser.add_argument("--work", type=Path, help="where datasets are built (default "
                        "<workspace>/bench-rankers)")
    parser.add_argument("--no-readme", action="store_true",
                        help="print only; leave benchmarks/README.md alone")
    parser.add_argument("--no-mlflow", action="store_true", help="log no MLflow run")
    parser.add_argument("--json", type=Path, help="also write all results as JSON here")
    parser.add_argument("--render", type=Path, help="rebuild the report from a results JSON "
                        "(--json or the MLflow run's rankers.json) instead of running")
    parser.add_argument("--ablation", action="store_true",
                        help="instead: the HoME investigation (parts, lr, epochs, capacity) "
                        "against MMoE and PLE on the simulator's VALID split")
    parser.add_argument("--render-ablation", type=Path,
                        help="rebuild the ablation section from its JSON-lines file")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: one contender
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- the datasets


def prepare(dataset: str, work: Path, args: argparse.Namespace) -> dict | None:
    """Build (or reuse) the dataset's examples under ``work/dataset``; None if unavailable."""
    from features.build import FeatureConfig
    from flows.steps import SimulateParams, features_step, ingest_step, simulate_step
    from flows.workspace import Workspace

    workspace = Workspace(work / dataset)
    if dataset == "simulator":
        raw = workspace.raw / f"simulator-seed0-users{args.users}-days{args.days}"
        source, input_path, config = "simulator", raw, FeatureConfig()
        stamp = {"users": args.users, "days": args.days}
    else:
        if not KUAIRAND.exists():
            print(f"kuairand: skipped, {KUAIRAND} is not there")
            return None
        source, input_path, config = "kuairand", KUAIRAND, FeatureConfig(valid_days=2,
                                                                          test_days=3)
        raw, stamp = None, {"file": str(KUAIRAND)}
    marker = workspace.root / "bench-dataset.json"
    if not (marker.exists() and json.loads(marker.read_text()) == stamp):
        import shutil

        shutil.rmtree(workspace.root, ignore_errors=True)
        workspace.create()
        if raw is not None:
            simulate_step(raw, SimulateParams(users=args.users, days=args.days, seed=0))
        ingest_step(source, input_path, workspace)
        features_step(workspace, config)
        marker.write_text(json.dumps(stamp))
    return {"dataset": dataset, "examples": str(workspace.examples),
            "ground_truth": str(raw) if raw is not None else None}


# ----------------------------------------------------------------------- one contender run


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def start_memory_window() -> float:
    """Reset the peak-RSS mark (Linux ``clear_refs`` 5) so the peak read later covers only
    training and inference, not data loading; returns the RSS now."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()


def peak_rss_mb() -> float:
    """Peak RSS since ``start_memory_window`` (VmHWM), else since process start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(spec: dict) -> dict:
    """Train and evaluate one contender on one dataset and seed (in this fresh process)."""
    import polars as pl
    import torch

    torch.set_num_threads(spec["threads"])
    from features.build import load_schema
    from models.batch import ExampleArrays

    examples = Path(spec["examples"])
    schema = load_schema(examples)
    split = spec.get("split", "test")  # ablations choose on "valid", never on test
    frames = {"train": pl.read_parquet(examples / "train.parquet"),
              "test": pl.read_parquet(examples / f"{split}.parquet")}
    arrays = {name: ExampleArrays.from_frame(frame, schema) for name, frame in frames.items()}
    load_before = os.getloadavg()[0]
    contender = spec["contender"]
    if contender.startswith("deepctr_"):
        result = run_deepctr(spec, schema, frames, arrays)
    else:
        result = run_ours(spec, schema, arrays)
    peak = peak_rss_mb()
    result.update(contender=contender, dataset=spec["dataset"], seed=spec["seed"],
                  peak_rss_mb=peak, rss_growth_mb=peak - result.pop("loaded_rss_mb"),
                  load_avg=(load_before + os.getloadavg()[0]) / 2)
    predictions = np.asarray(result.pop("predictions"))
    result["metrics"] = evaluate(predictions, arrays["test"], frames["test"], schema, spec)
    return result


def run_ours(spec: dict, schema, arrays: dict) -> dict:
    import torch

    from models import diagnostics
    from models.losses import MultiTaskLoss, task_predictions
    from models.rankers import RankerConfig, build_ranker, init_output_bias
    from models.training import TrainConfig, fit, predict_outputs

    torch.manual_seed(spec["seed"])
    ranker = {**spec["ranker"], **spec.get("overrides", {})}
    arch = SAME_FEATURES.get(spec["contender"], spec["contender"])
    if spec["contender"] in SAME_FEATURES:
        ranker["inputs"] = {**ranker["inputs"], "history_pooling": "mean"}
    config = RankerConfig.from_dict({**ranker, "arch": arch})
    model = build_ranker(schema, config)
    train = arrays["train"]
    init_output_bias(model, torch.from_numpy(train.labels))
    loss_fn = MultiTaskLoss(schema.tasks)
    train_config = TrainConfig(epochs=spec["epochs"], batch_size=spec["batch_size"],
                               learning_rate=spec["lr"], seed=spec["seed"], progress=False)
    loaded = start_memory_window()
    marks = [(time.perf_counter(), time.process_time())]
    fit(model, loss_fn, train, train_config, [t.name for t in schema.tasks],
        on_epoch_end=lambda _e, _l: marks.append((time.perf_counter(), time.process_time())))
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        outputs = predict_outputs(model, arrays["test"])
        passes.append(time.perf_counter() - start)
    predictions = task_predictions(torch.from_numpy(outputs), schema.tasks).numpy()
    activity = diagnostics.expert_activity(model, arrays["test"])
    return {
        "loaded_rss_mb": loaded,
        **epoch_speed(marks, len(train)),
        "infer_examples_per_s": len(arrays["test"]) / min(passes),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "n_experts": len(activity.names),
        "max_expert_zero_fraction": float(activity.zero_fraction.max()),
        "predictions": predictions,
    }


def deepctr_inputs(frame, schema) -> dict[str, np.ndarray]:
    """The example frame as DeepCTR's ``{feature name: array}``, histories padded with 0."""
    import polars as pl

    n = schema.history_length
    x = {f"{name}_idx": frame.get_column(f"{name}_idx").to_numpy()
         for name in schema.sparse_features}
    for column, name in (("hist_item_id_idx", "hist_item_id"),
                         ("hist_behavior", "hist_behavior")):
        padded = frame.select(pl.col(column).list.concat(
            pl.lit(0, dtype=pl.Int64).repeat_by(n - pl.col(column).list.len())
        ).list.to_array(n)).to_series().to_numpy()
        x[name] = padded.astype(np.int64)
    for name in schema.dense_features:
        x[name] = frame.get_column(name).to_numpy().astype(np.float32)
    return x


def build_deepctr(spec: dict, schema):
    """DeepCTR-Torch's MMOE or PLE on our examples' features, sized like ours."""
    import torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import MMOE, PLE

    torch.manual_seed(spec["seed"])
    dim = spec["ranker"]["inputs"]["embedding_dim"]
    sizes = schema.vocab_sizes
    columns = [SparseFeat(f"{name}_idx", sizes[name], embedding_dim=dim,
                          embedding_name=name) for name in schema.sparse_features]
    columns += [
        VarLenSparseFeat(SparseFeat("hist_item_id", sizes["item_id"], embedding_dim=dim,
                                    embedding_name="item_id"), maxlen=schema.history_length,
                         combiner="mean"),
        VarLenSparseFeat(SparseFeat("hist_behavior", schema.n_behaviors, embedding_dim=dim,
                                    embedding_name="behavior"), maxlen=schema.history_length,
                         combiner="mean"),
    ]
    columns += [DenseFeat(name, 1) for name in schema.dense_features]
    ranker = spec["ranker"]
    common = dict(expert_dnn_hidden_units=tuple(ranker["expert_hidden"]),
                  gate_dnn_hidden_units=(), tower_dnn_hidden_units=tuple(ranker["tower_hidden"]),
                  l2_reg_linear=0.0, l2_reg_embedding=0.0, l2_reg_dnn=0.0, seed=spec["seed"],
                  task_types=[t.kind for t in schema.tasks],
                  task_names=[t.name for t in schema.tasks], device="cpu")
    if spec["contender"] == "deepctr_mmoe":
        return MMOE(columns, num_experts=ranker["n_experts"], **common)
    # shared = specific: DeepCTR-Torch 0.3.0 crashes otherwise (see DEEPCTR_PLE_EXPERTS)
    return PLE(columns, shared_expert_num=DEEPCTR_PLE_EXPERTS,
               specific_expert_num=DEEPCTR_PLE_EXPERTS, num_levels=ranker["n_levels"], **common)


def run_deepctr(spec: dict, schema, frames: dict, arrays: dict) -> dict:
    import torch

    model = build_deepctr(spec, schema)
    losses = ["binary_crossentropy" if t.kind == "binary" else "mse" for t in schema.tasks]
    model.compile(torch.optim.Adam(model.parameters(), lr=spec["lr"]), loss=losses,
                  metrics=[])
    train_x = deepctr_inputs(frames["train"], schema)
    test_x = deepctr_inputs(frames["test"], schema)
    labels = arrays["train"].labels
    if np.isnan(labels).any():
        raise ValueError("DeepCTR cannot mask unobserved labels, and this dataset has some")
    loaded = start_memory_window()
    marks = [(time.perf_counter(), time.process_time())]
    for _ in range(spec["epochs"]):
        model.fit(train_x, labels, batch_size=spec["batch_size"], epochs=1, verbose=0,
                  shuffle=True)
        marks.append((time.perf_counter(), time.process_time()))
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        raw = model.predict(test_x, batch_size=4096)
        passes.append(time.perf_counter() - start)
    binary = np.array([t.kind == "binary" for t in schema.tasks])
    predictions = np.where(binary[None, :], raw, np.expm1(np.minimum(raw, 20.0)))
    return {
        "loaded_rss_mb": loaded,
        **epoch_speed(marks, len(arrays["train"])),
        "infer_examples_per_s": len(arrays["test"]) / min(passes),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "predictions": predictions,
    }


def epoch_speed(marks: list[tuple[float, float]], rows: int) -> dict:
    """Best-epoch wall throughput, overall wall throughput and CPU seconds per 1k examples
    from (wall, cpu) marks at the start and after every epoch."""
    walls = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
    cpu = marks[-1][1] - marks[0][1]
    return {"train_examples_per_s": rows / min(walls),
            "train_examples_per_s_overall": rows * len(walls) / sum(walls),
            "train_cpu_s_per_1k": 1000 * cpu / (rows * len(walls)),
            "train_seconds": sum(walls)}


def evaluate(predictions: np.ndarray, test, frame, schema, spec: dict) -> dict:
    """task_metrics on the test split, plus the oracle metrics where ground truth exists."""
    from evaluation.metrics import task_metrics
    from flows.steps import add_oracle_metrics, load_ground_truth

    metrics = task_metrics(predictions, test.labels, test.user_ids, schema.tasks)
    if spec.get("ground_truth"):
        rows, p_true, _ = load_ground_truth(Path(spec["ground_truth"]), frame)
        add_oracle_metrics(metrics, test, predictions, rows, p_true, schema.tasks)
    return metrics


# --------------------------------------------------------------------------- the benchmark


def default_ranker() -> dict:
    from models.rankers import RankerConfig

    config = RankerConfig().to_dict()
    config.pop("arch")
    return config


def run_contender(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
           "MKL_NUM_THREADS": str(spec["threads"]), "OMP_WAIT_POLICY": "PASSIVE"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run-one",
                               handle.name], env=env, capture_output=True, text=True,
                              cwd=ROOT)
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['contender']} on {spec['dataset']} failed:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], dataset: str) -> list[dict]:
    """One row per contender: quality means (and mean-AUC std) over seeds, speeds of the
    fastest seed, memory means."""
    tasks = EVALUATED[dataset]
    rows = []
    for contender in dict.fromkeys(run["contender"] for run in runs):
        mine = [run for run in runs if run["contender"] == contender]
        row: dict = {"contender": contender, "seeds": len(mine)}
        for task in tasks:
            for name in ("auc", "gauc", "oracle_auc", "auc_oracle_ratio"):
                values = [run["metrics"][task].get(name, np.nan) for run in mine]
                row[f"{task}_{name}"] = float(np.mean(values))
        mean_auc = [np.mean([run["metrics"][t]["auc"] for t in tasks]) for run in mine]
        mean_gauc = [np.mean([run["metrics"][t]["gauc"] for t in tasks]) for run in mine]
        row.update(mean_auc=float(np.mean(mean_auc)), mean_auc_std=float(np.std(mean_auc)),
                   mean_gauc=float(np.mean(mean_gauc)))
        # speeds: the best seed (timing noise on a shared machine only ever slows a run down)
        row["train_examples_per_s"] = float(max(run["train_examples_per_s"] for run in mine))
        row["infer_examples_per_s"] = float(max(run["infer_examples_per_s"] for run in mine))
        row["train_cpu_s_per_1k"] = float(min(run["train_cpu_s_per_1k"] for run in mine))
        for name in ("peak_rss_mb", "rss_growth_mb", "n_parameters", "load_avg"):
            row[name] = float(np.mean([run[name] for run in mine]))
        if "max_expert_zero_fraction" in mine[0]:
            row["max_expert_zero_fraction"] = float(max(r["max_expert_zero_fraction"]
                                                        for r in mine))
            row["n_experts"] = mine[0]["n_experts"]
        rows.append(row)
    return rows


LABELS = {"shared_bottom": "ours Shared-Bottom", "mmoe": "ours MMoE", "cgc": "ours CGC",
          "ple": "ours PLE", "home": "ours HoME",
          "mmoe_meanpool": "ours MMoE, mean-pooled history", "ple_meanpool":
          "ours PLE, mean-pooled history", "deepctr_mmoe": "DeepCTR-Torch MMOE",
          "deepctr_ple": "DeepCTR-Torch PLE"}


def table(rows: list[dict], dataset: str) -> str:
    tasks = EVALUATED[dataset]
    head = (["contender"] + [f"{t} AUC / GAUC" for t in tasks]
            + ["mean AUC (± sd)", "mean GAUC", "train ex/s", "CPU s / 1k ex", "infer ex/s",
               "peak RSS MB (+ over data)", "params", "experts (max zero act.)"])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        cells = [LABELS[row["contender"]]]
        cells += [f"{row[f'{t}_auc']:.4f} / {row[f'{t}_gauc']:.4f}" for t in tasks]
        cells += [f"{row['mean_auc']:.4f} ± {row['mean_auc_std']:.4f}",
                  f"{row['mean_gauc']:.4f}", f"{row['train_examples_per_s']:,.0f}",
                  f"{row['train_cpu_s_per_1k']:.3f}", f"{row['infer_examples_per_s']:,.0f}",
                  f"{row['peak_rss_mb']:,.0f} (+{row['rss_growth_mb']:,.0f})",
                  f"{row['n_parameters']:,.0f}",
                  (f"{row['n_experts']} ({row['max_expert_zero_fraction']:.0%})"
                   if "n_experts" in row else "n/a")]
        lines.append("| " + " | ".join(cells) + " |")
    if dataset == "simulator" and not np.isnan(rows[0][f"{tasks[0]}_oracle_auc"]):
        lines += ["", "Oracle (true probabilities) on the same test rows, and each model's "
                  "share of the attainable lift (AUC − 0.5) / (oracle AUC − 0.5):", "",
                  "| contender | " + " | ".join(tasks) + " |",
                  "|---" + "|---:" * len(tasks) + "|",
                  "| oracle AUC | " + " | ".join(f"{rows[0][f'{t}_oracle_auc']:.4f}"
                                                  for t in tasks) + " |"]
        for row in rows:
            lines.append(f"| {LABELS[row['contender']]} | " + " | ".join(
                f"{row[f'{t}_auc_oracle_ratio']:.3f}" for t in tasks) + " |")
    return "\n".join(lines)


def paired_speedups(runs: list[dict], ours: str, theirs: str) -> list[float]:
    """Per seed, ours' training examples/s over theirs' (same seed: same load window)."""
    speed = {(run["contender"], run["seed"]): run["train_examples_per_s"] for run in runs}
    seeds = sorted({seed for name, seed in speed if name == ours})
    return [speed[ours, seed] / speed[theirs, seed] for seed in seeds
            if (theirs, seed) in speed]


def verdicts(rows: list[dict], dataset: str, runs: list[dict]) -> list[str]:
    """The issue's targets, checked on this dataset's rows (speed: the median over seeds of
    the paired per-seed ratio, steadier than fastest vs fastest when epochs are short)."""
    by = {row["contender"]: row for row in rows}
    lines = []
    for ours_name, what in (("mmoe_meanpool", "same features (mean-pooled history)"),
                            ("mmoe", "ours with target attention")):
        if {ours_name, "deepctr_mmoe"} <= set(by):
            ours, theirs = by[ours_name], by["deepctr_mmoe"]
            auc_ok = ours["mean_auc"] >= theirs["mean_auc"]
            speed = ours["train_examples_per_s"] / theirs["train_examples_per_s"]
            paired = paired_speedups(runs, ours_name, "deepctr_mmoe")
            median = float(np.median(paired))
            cpu = theirs["train_cpu_s_per_1k"] / ours["train_cpu_s_per_1k"]
            verdict = ("target: match its AUC and train at ≥ 2×: "
                       f"{'met' if auc_ok and median >= 2 else 'NOT met'}"
                       if ours_name == "mmoe_meanpool" else "for reference")
            lines.append(f"{LABELS[ours_name]} vs DeepCTR MMOE, {what}: mean AUC "
                         f"{ours['mean_auc']:.4f} vs {theirs['mean_auc']:.4f}; training "
                         f"{median:.2f}× its examples/s (median of the per-seed ratios "
                         f"{' / '.join(f'{r:.2f}' for r in paired)}; fastest vs fastest "
                         f"{speed:.2f}×), {cpu:.2f}× per CPU second ({verdict})")
    if dataset == "simulator" and {"home", "mmoe", "ple"} <= set(by):
        home = by["home"]
        beats = all(home["mean_auc"] > by[o]["mean_auc"] for o in ("mmoe", "ple"))
        collapse = home["max_expert_zero_fraction"]
        lines.append(f"HoME vs MMoE / PLE mean AUC: {home['mean_auc']:.4f} vs "
                     f"{by['mmoe']['mean_auc']:.4f} / {by['ple']['mean_auc']:.4f} "
                     f"({'met' if beats else 'NOT met'}); HoME's largest expert zero-"
                     f"activation fraction {collapse:.1%} (target ≤ 90%: "
                     f"{'met' if collapse <= 0.9 else 'NOT met'})")
    return lines


def machine(args: argparse.Namespace) -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import deepctr_torch

        deepctr = deepctr_torch.__version__
    except ImportError:
        deepctr = None
    return {"cores": os.cpu_count(), "cpu": cpu, "gpu": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__,
            "deepctr_torch": deepctr, "threads": args.threads,
            "load_avg_start": os.getloadavg()[0]}


def attention_share(sections: dict[str, tuple[list[dict], list[str]]]) -> str:
    """What share of an MMoE step the target attention costs, per dataset, from the CPU
    columns of the MMoE rows with and without it."""
    shares = []
    for dataset, (rows, _) in sections.items():
        cpu = {row["contender"]: row["train_cpu_s_per_1k"] for row in rows}
        if cpu.get("mmoe") and cpu.get("mmoe_meanpool"):
            shares.append(f"{dataset} {1 - cpu['mmoe_meanpool'] / cpu['mmoe']:.0%}")
    if not shares:
        return ""
    return (f"Target attention over the history costs this share of an MMoE step (CPU s, "
            f"MMoE with vs without it): {', '.join(shares)}. ")


def markdown(sections: dict[str, tuple[list[dict], list[str]]], info: dict,
             args: argparse.Namespace) -> str:
    ranker = default_ranker()
    lines = [
        BEGIN,
        "## Multi-task rankers: ours vs DeepCTR-Torch (`benchmarks/rankers.py`)",
        "",
        f"Command: `make bench-rankers` (`.venv-bench/bin/python benchmarks/rankers.py "
        f"--seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs}`). Machine: "
        f"{info['cores']} cores ({info['cpu']}), no GPU, Python {info['python']}, torch "
        f"{info['torch']}, deepctr-torch {info['deepctr_torch']}; torch threads = "
        f"{args.threads} and `OMP_WAIT_POLICY=PASSIVE` for every contender, each in its own "
        f"process. Load average {info['load_avg_start']:.1f} at the start, "
        f"{info['load_avg_end']:.1f} at the end"
        + (f": other jobs shared these {info['cores']} cores, so wall-clock speeds are noisy"
           if max(info['load_avg_start'], info['load_avg_end']) >= 0.5 * info['cores']
           else "") + " (the table shows the best epoch of the fastest seed; the targets use "
        "the median of per-seed paired ratios); CPU s / 1k examples is steadier.",
        "",
        f"Same for all: embedding dim {ranker['inputs']['embedding_dim']}, experts "
        f"{'-'.join(map(str, ranker['expert_hidden']))} (ReLU; HoME: Swish + BatchNorm), towers "
        f"{'-'.join(map(str, ranker['tower_hidden']))}, linear gates, {ranker['n_experts']} "
        f"shared experts (PLE/CGC: + {ranker['n_task_experts']} per task per level, "
        f"{ranker['n_levels']} PLE levels; HoME: {ranker['n_experts']} global + "
        f"{ranker['n_category_experts']} per category per level + {ranker['n_task_experts']} "
        f"per task, feature-gate rank {ranker['feature_gate_rank']}), {args.epochs} epochs, "
        f"batch {args.batch_size}, Adam lr {args.lr}, seeds {args.seeds} (quality: means over "
        "seeds; speed: the fastest seed). Tasks: click, like, follow, long_view (binary) and "
        "watch_time (log1p seconds, MSE). Ours pool the history by target attention; "
        "DeepCTR's MMOE/PLE can only mean-pool it, so the issue's \"same features\" speed "
        "comparison is `ours MMoE, mean-pooled history` (`history_pooling=\"mean\"`: the "
        "same item and behaviour tables, mean over the real positions, no attention) against "
        "DeepCTR's MMOE; the attention rows show what the extra feature costs and buys.",
    ]
    for dataset, (rows, checks) in sections.items():
        lines += ["", f"### {dataset}", "", table(rows, dataset), ""]
        lines += [f"- {check}" for check in checks]
    lines += ["", "Notes:", "",
              f"- DeepCTR-Torch 0.3.0's PLE only runs with as many shared as task experts (it "
              f"builds `specific_expert_num` shared experts); it gets {DEEPCTR_PLE_EXPERTS} + "
              f"{DEEPCTR_PLE_EXPERTS} per task (ours: {ranker['n_experts']} + "
              f"{ranker['n_task_experts']}).",
              "- DeepCTR starts its output layers at 0, ours at each task's base rate "
              "(`init_output_bias`). On KuaiRand (a few dozen steps an epoch) DeepCTR is still "
              "finding the intercept after 2 epochs and ranks below chance on train as well. "
              "Same epochs for everyone, so the table shows it.",
              "- KuaiRand's test days hold a few dozen likes, so like AUC swings by several "
              "points between seeds; `follow` (a handful of positives in the whole log) is left "
              "out of its means. GAUC near or below 0.5 there: random exposures carry little "
              "within-user signal and most test videos are unseen in training.",
              "- The mean-pooled rows are not exactly DeepCTR's input: DeepCTR concatenates the "
              "item and the behaviour means (two history vectors), ours adds them into one, "
              "hence its slightly larger first layers (the params column).",
              "- Speed is wall clock on a shared machine; the CPU-seconds column is the steadier "
              f"cost. {attention_share(sections)}Mean pooling runs the history through one "
              "EmbeddingBagCollection lookup per table instead."]
    lines.append(END)
    return "\n".join(lines)


def write_readme(text: str) -> None:
    current = README.read_text() if README.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if pattern.search(current):
        updated = pattern.sub(lambda _m: text, current)
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    README.write_text(updated)


def log_mlflow(results: dict, report: str, info: dict, args: argparse.Namespace) -> str:
    import mlflow

    from flows.workspace import Workspace
    from models.registry import ensure_experiment

    workspace = Workspace.from_env().create()
    mlflow.set_tracking_uri(workspace.tracking_uri)
    experiment = ensure_experiment(EXPERIMENT, workspace.artifacts)
    with mlflow.start_run(experiment_id=experiment, run_name="rankers") as run:
        mlflow.log_params({"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                           "threads": args.threads, "seeds": str(args.seeds),
                           "contenders": ",".join(args.contenders), **{
                               f"machine.{k}": str(v) for k, v in info.items()}})
        for dataset, rows in results["summary"].items():
            for row in rows:
                for key, value in row.items():
                    if isinstance(value, float) and value == value:
                        mlflow.log_metric(f"{dataset}.{row['contender']}.{key}", value)
        mlflow.log_text(report, "rankers.md")
        mlflow.log_dict(results, "rankers.json")
    return run.info.run_id


ABLATION_BEGIN = "<!-- rankers-ablation:begin -->"
ABLATION_END = "<!-- rankers-ablation:end -->"
ABLATION_PLAN: tuple[tuple[str, dict, dict], ...] = (
    ("mmoe", {}, {}), ("ple", {}, {}), ("home", {}, {}),
    ("home", {"expert_norm": False}, {}), ("home", {"feature_gate_rank": 0}, {}),
    ("home", {"self_gate": False}, {}),
    ("home", {}, {"lr": 1e-3}), ("mmoe", {}, {"lr": 1e-3}), ("ple", {}, {"lr": 1e-3}),
    ("home", {}, {"epochs": 4}), ("mmoe", {}, {"epochs": 4}), ("ple", {}, {"epochs": 4}),
    ("home", {"expert_hidden": (128, 64)}, {}), ("mmoe", {"expert_hidden": (128, 64)}, {}),
)
"""(arch, RankerConfig overrides, training overrides): HoME's parts switched off one at a
time, a lower learning rate, twice the epochs and twice the expert width, each next to MMoE
and PLE where it applies."""


def ablation(args: argparse.Namespace) -> int:
    """Run (or re-render) ``ABLATION_PLAN`` on the simulator's valid split: choices are made
    on valid, the test split stays for the benchmark table."""
    if args.render_ablation:
        records = [json.loads(line) for line in args.render_ablation.read_text().splitlines()]
    else:
        from flows.workspace import Workspace

        work = args.work or Workspace.from_env().root / "bench-rankers"
        prepared = prepare("simulator", work, args)
        log = (args.json or work / "ablation.jsonl").open("a")
        records = []
        for seed in args.seeds:
            for arch, overrides, training in ABLATION_PLAN:
                spec = {**prepared, "epochs": args.epochs, "batch_size": args.batch_size,
                        "lr": args.lr, "threads": args.threads, "ranker": default_ranker(),
                        **training, "contender": arch, "seed": seed, "overrides": overrides,
                        "split": "valid"}
                run = run_contender(spec)
                record = {"arch": arch, "over": overrides, "train": training, "seed": seed,
                          "per_task": {t: run["metrics"][t]["auc"]
                                       for t in EVALUATED["simulator"]},
                          "zero": run.get("max_expert_zero_fraction")}
                record["valid_mean_auc"] = float(np.mean(list(record["per_task"].values())))
                print(json.dumps(record), flush=True)
                log.write(json.dumps(record) + "\n")
                log.flush()
                records.append(record)
    text = ablation_markdown(records)
    print(text)
    if not args.no_readme:
        current = README.read_text()
        pattern = re.compile(re.escape(ABLATION_BEGIN) + ".*?" + re.escape(ABLATION_END), re.S)
        if pattern.search(current):
            README.write_text(pattern.sub(lambda _m: text, current))
        else:  # right after the benchmark section
            README.write_text(current.replace(END, END + "\n\n" + text, 1))
    return 0


def ablation_markdown(records: list[dict]) -> str:
    tasks = EVALUATED["simulator"]
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record["arch"], json.dumps(record["over"]), json.dumps(record["train"]))
        groups.setdefault(key, []).append(record)
    lines = [ABLATION_BEGIN, "### HoME investigation (simulator, valid split)", "",
             "`benchmarks/rankers.py --ablation`: each change alone, on the validation day "
             "(the test day is only used for the table above). Mean AUC over "
             f"{', '.join(tasks)}; seeds per row in brackets.", "",
             "| model | change | mean AUC | " + " | ".join(tasks) + " | max zero act. |",
             "|---|---|---:|" + "---:|" * len(tasks) + "---:|"]
    for (arch, over, train), rows in groups.items():
        change = ", ".join(f"{k}={v}" for k, v in {**json.loads(over),
                                                   **json.loads(train)}.items()) or "default"
        mean = np.mean([r["valid_mean_auc"] for r in rows])
        per_task = " | ".join(f"{np.mean([r['per_task'][t] for r in rows]):.4f}"
                              for t in tasks)
        zero = max(r["zero"] for r in rows)
        lines.append(f"| {LABELS[arch]} | {change} | {mean:.4f} [{len(rows)}] | {per_task} | "
                     f"{zero:.0%} |")
    lines.append(ABLATION_END)
    return "\n".join(lines)


def render(args: argparse.Namespace) -> int:
    """Re-summarise saved runs (same statistics as a live run) and write the report."""
    results = json.loads(args.render.read_text())
    info, runs = results["machine"], results["runs"]
    args.seeds = sorted({run["seed"] for run in runs})
    for name, value in results.get("config", {}).items():  # the run's own settings
        setattr(args, name, value)
    sections = {}
    for dataset in dict.fromkeys(run["dataset"] for run in runs):
        rows = summarise([run for run in runs if run["dataset"] == dataset], dataset)
        results["summary"][dataset] = rows
        sections[dataset] = (rows, verdicts(rows, dataset, [
            run for run in runs if run["dataset"] == dataset]))
    report = markdown(sections, info, args)
    print(report)
    if not args.no_readme:
        write_readme(report)
    if not args.no_mlflow:
        print(f"MLflow run {log_mlflow(results, report, info, args)} in experiment "
              f"{EXPERIMENT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_one:
        spec = json.loads(Path(args.run_one).read_text())
        print(json.dumps(run_one(spec), default=float))
        return 0
    try:
        import deepctr_torch  # noqa: F401
    except ImportError:
        dropped = [c for c in args.contenders if c in DEEPCTR]
        if dropped:
            print(f"deepctr-torch is not installed here ({sys.executable}); skipping "
                  f"{dropped}. `make bench-env` builds .venv-bench with it. Without the peer "
                  "nothing is written to benchmarks/README.md or MLflow.")
            args.contenders = [c for c in args.contenders if c not in DEEPCTR]
            args.no_readme = args.no_mlflow = True
    if args.render:
        return render(args)
    if args.ablation or args.render_ablation:
        return ablation(args)
    from flows.workspace import Workspace

    work = args.work or Workspace.from_env().root / "bench-rankers"
    info = machine(args)
    ranker = default_ranker()
    results: dict = {"machine": info, "runs": [], "summary": {},
                     "config": {"epochs": args.epochs, "batch_size": args.batch_size,
                                "lr": args.lr, "threads": args.threads}}
    sections: dict[str, tuple[list[dict], list[str]]] = {}
    for dataset in args.data:
        prepared = prepare(dataset, work, args)
        if prepared is None:
            continue
        runs = []
        for seed in args.seeds:  # seeds outermost: load drifts hit every contender alike
            for contender in args.contenders:
                spec = {**prepared, "contender": contender, "seed": seed,
                        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                        "threads": args.threads, "ranker": ranker}
                started = time.perf_counter()
                run = run_contender(spec)
                runs.append(run)
                mean = np.mean([run["metrics"][t]["auc"] for t in EVALUATED[dataset]])
                print(f"{dataset} seed {seed} {contender:>13}: mean AUC {mean:.4f}, "
                      f"{run['train_examples_per_s']:,.0f} train ex/s, "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
        rows = summarise(runs, dataset)
        results["runs"] += runs
        results["summary"][dataset] = rows
        sections[dataset] = (rows, verdicts(rows, dataset, runs))
    info["load_avg_end"] = os.getloadavg()[0]
    report = markdown(sections, info, args)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if not args.no_readme:
        write_readme(report)
    if not args.no_mlflow:
        print(f"MLflow run {log_mlflow(results, report, info, args)} in experiment "
              f"{EXPERIMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
