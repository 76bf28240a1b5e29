"""Downstream proof of the self-supervised user models (issue 5).

Same encoder (size, architecture) and the same pretraining budget (optimiser steps, batch)
for every method, over several seeds:

1. linear probes: logistic regression predicting the simulator's hidden user attributes
   (activity group, age bucket, gender) from frozen user vectors (each user's most recent
   training-split history); accuracy and macro-F1 on a fixed held-out 30% of the users;
2. rankers: MMoE with the pretrained encoder in its ``user_encoder`` slot (fine-tuned, and
   frozen unless ``--no-frozen``) vs the same ranker with a randomly initialised encoder
   trained from scratch (method ``none``) and vs MMoE without a user encoder; per-task AUC on
   the test days of the simulator and of KuaiRand-1K (skipped with a note when absent);
3. the same rankers with a random 10% of the labelled training rows (pretraining still
   sees every training history: it needs no labels).

Every hyperparameter is a code default (encoder, objectives, ranker, training). The only
choice made by looking at numbers, the augmentation rates, was made on a separate
development world (simulator seed 7, ``--world-seed 7``), never on this benchmark's world
(seed 0) or on any test day; no run selects anything on a test split. Deterministic for a
fixed ``--threads`` (default 1).

    .venv/bin/python benchmarks/user_models.py --quick           # minutes: a smoke run
    .venv/bin/python benchmarks/user_models.py                   # the README numbers
    .venv/bin/python benchmarks/user_models.py --write-readme    # …and update the table

Prints the markdown tables; ``--json PATH`` also keeps every number (per seed),
``--from-results PATH`` re-renders a kept run, and ``--write-readme`` replaces the section
between the ``user-models`` markers of ``benchmarks/README.md`` (appending it when absent),
leaving the other sections alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation.metrics import task_metrics  # noqa: E402
from features.build import FeatureConfig, load_schema  # noqa: E402
from features.vocab import Vocabulary  # noqa: E402
from flows.steps import SimulateParams, features_step, ingest_step, simulate_step  # noqa: E402
from flows.workspace import Workspace  # noqa: E402
from models.batch import ExampleArrays  # noqa: E402
from models.losses import MultiTaskLoss, task_predictions  # noqa: E402
from models.pretraining import PretrainConfig, UserSequences, embed, pretrain  # noqa: E402
from models.rankers import RankerConfig, build_ranker, init_output_bias  # noqa: E402
from models.training import TrainConfig, fit, predict_outputs  # noqa: E402
from models.user_encoders import (  # noqa: E402
    AdaptSSRConfig,
    PretrainedUserEncoder,
    UserEncoderConfig,
)

KUAIRAND_CSV = ROOT.parent / "shared" / "data" / "kuairand-1k" / "log_random_4_22_to_5_08_1k.csv"
README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- user-models:begin -->", "<!-- user-models:end -->"
ATTRIBUTES: tuple[str, ...] = ("activity_group", "age_bucket", "gender")
METHODS: tuple[str, ...] = ("none", "mip", "cl4srec", "adaptssr")
ABLATIONS: tuple[str, ...] = ("adaptssr_cold",)
"""Probe-only variants: ``adaptssr_cold`` is AdaptSSR without the MIP warm start."""
MIN_POSITIVES = 20
"""A task's test AUC is reported only with at least this many positives (else "—")."""


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and budgets of one benchmark run (recorded in the results file)."""

    users: int = 2000
    """Simulated users."""
    days: int = 7
    """Simulated days (last = test, the one before = valid)."""
    world_seed: int = 0
    """Simulator seed: one fixed world and log for every method and seed."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Model seeds (pretraining, probe-free; ranker init, shuffling, 10% subsample)."""
    methods: tuple[str, ...] = METHODS
    """Pretraining methods compared ("none": a freshly initialised encoder)."""
    ablations: tuple[str, ...] = ABLATIONS
    """Extra pretraining variants for the probes only (not the rankers)."""
    steps: int = 1000
    """Pretraining optimiser steps per method (AdaptSSR's MIP warm start included)."""
    batch_size: int = 128
    """Distinct users per pretraining step."""
    embedding_dim: int = 32
    """D of the user encoder (2 layers, 2 heads, FFN 4D: the encoder default)."""
    ranker_epochs: int = 2
    """Ranker epochs over its (full or 10%) training rows."""
    fractions: tuple[float, ...] = (1.0, 0.1)
    """Shares of the labelled training rows the rankers see."""
    frozen: bool = True
    """Also train rankers with the pretrained encoder frozen."""
    rankers: bool = True
    """Run the ranker comparison (probes always run on the simulator)."""
    kuairand: str | None = str(KUAIRAND_CSV)
    """KuaiRand-1K CSV (None or missing: skipped)."""
    threads: int = 1
    """torch intra-op threads (fixed, so that runs are reproducible)."""

    def pretrain_config(self, method: str, seed: int) -> PretrainConfig:
        encoder = UserEncoderConfig(embedding_dim=self.embedding_dim,
                                    ffn_dim=4 * self.embedding_dim)
        extra = {}
        if method == "adaptssr_cold":
            method, extra = "adaptssr", {"adaptssr": AdaptSSRConfig(warm_start_fraction=0.0)}
        return PretrainConfig(method=method, steps=self.steps, batch_size=self.batch_size,
                              seed=seed, progress=False, encoder=encoder, **extra)


QUICK = BenchConfig(users=600, days=5, seeds=(0,), steps=120, ranker_epochs=1, frozen=False)


@dataclass
class Dataset:
    """One example table and what the benchmark needs of it."""

    name: str
    examples: Path
    feature_config: FeatureConfig
    users_table: Path | None = None
    notes: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_simulator(config: BenchConfig, workdir: Path) -> Dataset:
    workspace = Workspace(workdir / "simulator").create()
    raw = workspace.raw / "sim"
    simulate_step(raw, SimulateParams(config.users, config.days, config.world_seed))
    ingest_step("simulator", raw, workspace)
    features = FeatureConfig(history_length=20, valid_days=1, test_days=1)
    features_step(workspace, features)
    return Dataset("simulator", workspace.examples, features, raw / "users.parquet")


def prepare_kuairand(config: BenchConfig, workdir: Path) -> Dataset | None:
    if not config.kuairand or not Path(config.kuairand).exists():
        return None
    workspace = Workspace(workdir / "kuairand").create()
    ingest_step("kuairand", Path(config.kuairand), workspace)
    # 17 days, ~1-4k impressions a day: three test days so that rare tasks have positives
    features = FeatureConfig(history_length=20, valid_days=2, test_days=3)
    features_step(workspace, features)
    return Dataset("kuairand", workspace.examples, features)


def pretrain_encoders(config: BenchConfig, dataset: Dataset,
                      methods: tuple[str, ...]) -> dict[tuple[str, int], dict]:
    """(method, seed) → {"encoder", "seconds", "final"} trained on the training histories."""
    schema = load_schema(dataset.examples)
    train = pl.read_parquet(dataset.examples / "train.parquet")
    data = UserSequences.from_frame(train, schema.history_length, min_length=2)
    log(f"{dataset.name}: {len(data):,} training windows of {data.n_users:,} users")
    encoders = {}
    for seed in config.seeds:
        for method in methods:
            pretrain_config = config.pretrain_config(method, seed).for_schema(schema)
            started = time.perf_counter()
            result = pretrain(data, pretrain_config)
            seconds = time.perf_counter() - started
            final = result.history[-1] if result.history else {}
            encoders[(method, seed)] = {"encoder": result.encoder, "seconds": seconds,
                                        "final": final}
            log(f"  pretrain {method:<13} seed {seed}: {seconds:6.1f} s "
                + " ".join(f"{k}={v:.3f}" for k, v in final.items()
                           if k in ("loss", "acc_pos_semi", "acc_semi_neg", "lambda",
                                    "cl_accuracy", "mip_accuracy")))
    return encoders


def probe_users(dataset: Dataset) -> tuple[UserSequences, pl.DataFrame]:
    """Each user's most recent non-empty training window, joined to the hidden attributes."""
    schema = load_schema(dataset.examples)
    train = pl.read_parquet(dataset.examples / "train.parquet")
    latest = UserSequences.from_frame(train, schema.history_length, min_length=1,
                                      latest_only=True)
    users = pl.read_parquet(dataset.users_table)
    labels = pl.DataFrame({"user_id": latest.user_ids}).join(users, on="user_id", how="left",
                                                            maintain_order="left")
    return latest, labels


def run_probes(config: BenchConfig, dataset: Dataset, encoders: dict) -> list[dict]:
    """Linear probes of frozen user vectors: one fixed 70/30 user split for every run."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    latest, labels = probe_users(dataset)
    train_rows, test_rows = train_test_split(np.arange(len(latest)), test_size=0.3,
                                             random_state=0)
    rows = []
    for (method, seed), trained in encoders.items():
        vectors = embed(trained["encoder"], latest)
        for attribute in ATTRIBUTES:
            y = labels.get_column(attribute).to_numpy()
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            probe.fit(vectors[train_rows], y[train_rows])
            predicted = probe.predict(vectors[test_rows])
            rows.append({
                "method": method, "seed": seed, "attribute": attribute,
                "accuracy": float(accuracy_score(y[test_rows], predicted)),
                "macro_f1": float(f1_score(y[test_rows], predicted, average="macro")),
                # the training users' majority class, scored on the held-out users
                "majority": float(np.mean(y[test_rows] == np.bincount(y[train_rows]).argmax())),
            })
    log(f"  probes on {len(train_rows)} / {len(test_rows)} users (train / held out)")
    return rows


def ranker_variants(config: BenchConfig) -> list[tuple[str, str | None, bool]]:
    """(label, method or None for no user encoder, freeze)."""
    variants: list[tuple[str, str | None, bool]] = [("mmoe, no user encoder", None, False)]
    variants += [(f"{m} (fine-tuned)" if m != "none" else "none (scratch)", m, False)
                 for m in config.methods]
    if config.frozen:
        variants += [(f"{m} (frozen)", m, True) for m in config.methods]
    return variants


def run_rankers(config: BenchConfig, dataset: Dataset, encoders: dict) -> list[dict]:
    schema = load_schema(dataset.examples)
    vocab = Vocabulary.load(dataset.examples / "vocab.json")
    train_frame = pl.read_parquet(dataset.examples / "train.parquet")
    test = ExampleArrays.from_parquet(dataset.examples / "test.parquet", schema)
    names = [task.name for task in schema.tasks]
    binary = [task.name for task in schema.tasks if task.kind == "binary"]
    rows = []
    for fraction in config.fractions:
        for seed in config.seeds:
            if fraction < 1.0:
                chosen = np.sort(np.random.default_rng(seed).choice(
                    train_frame.height, size=int(round(fraction * train_frame.height)),
                    replace=False))
                train = ExampleArrays.from_frame(train_frame[chosen], schema)
            else:
                train = ExampleArrays.from_frame(train_frame, schema)
            for label, method, freeze in ranker_variants(config):
                adapter = None
                if method is not None:
                    encoder = copy.deepcopy(encoders[(method, seed)]["encoder"])
                    adapter = PretrainedUserEncoder.for_vocabularies(encoder, vocab, vocab,
                                                                     freeze=freeze)
                torch.manual_seed(seed)
                model = build_ranker(schema, RankerConfig(), user_encoder=adapter)
                init_output_bias(model, torch.from_numpy(train.labels))
                train_config = TrainConfig(epochs=config.ranker_epochs, seed=seed,
                                           progress=False)
                started = time.perf_counter()
                fit(model, MultiTaskLoss(schema.tasks), train, train_config, names)
                seconds = time.perf_counter() - started
                outputs = torch.from_numpy(predict_outputs(model, test))
                predictions = task_predictions(outputs, schema.tasks).numpy()
                metrics = task_metrics(predictions, test.labels, test.user_ids, schema.tasks)
                auc = {task: (metrics[task]["auc"]
                              if metrics[task]["positive_rate"] * metrics[task]["n"]
                              >= MIN_POSITIVES else float("nan")) for task in binary}
                rows.append({"dataset": dataset.name, "fraction": fraction, "seed": seed,
                             "variant": label, "method": method, "freeze": freeze,
                             "train_rows": len(train), "seconds": seconds, "auc": auc,
                             "gauc": {t: metrics[t]["gauc"] for t in binary}})
                log(f"  {dataset.name} {fraction:>4.0%} seed {seed} {label:<22} "
                    f"{seconds:6.1f} s  " + " ".join(f"{t}={v:.4f}" for t, v in auc.items()))
    return rows


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def probe_table(rows: list[dict], methods: tuple[str, ...]) -> str:
    header = "| method | " + " | ".join(
        f"{a} acc | {a} F1" for a in ATTRIBUTES) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(ATTRIBUTES))]
    for method in methods:
        cells = []
        for attribute in ATTRIBUTES:
            chosen = [r for r in rows if r["method"] == method and r["attribute"] == attribute]
            cells += [mean_std([r["accuracy"] for r in chosen]),
                      mean_std([r["macro_f1"] for r in chosen])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    majority = []
    for attribute in ATTRIBUTES:
        chosen = [r["majority"] for r in rows if r["attribute"] == attribute]
        majority += [f"{chosen[0]:.4f}" if chosen else "—", "—"]
    lines.append("| (majority class) | " + " | ".join(majority) + " |")
    return "\n".join(lines)


def ranker_table(rows: list[dict], dataset: str, fraction: float) -> str:
    chosen = [r for r in rows if r["dataset"] == dataset and r["fraction"] == fraction]
    if not chosen:
        return ""
    tasks = list(chosen[0]["auc"])
    scratch = {r["seed"]: r for r in chosen if r["variant"] == "none (scratch)"}
    lines = ["| ranker | " + " | ".join(f"{t} AUC" for t in tasks)
             + " | mean AUC | gain vs scratch |",
             "|" + "---|" * (len(tasks) + 3)]
    for variant in dict.fromkeys(r["variant"] for r in chosen):
        runs = [r for r in chosen if r["variant"] == variant]
        cells = [mean_std([r["auc"][t] for r in runs]) for t in tasks]
        means = [np.nanmean(list(r["auc"].values())) for r in runs]
        gains = [means[i] - np.nanmean(list(scratch[r["seed"]]["auc"].values()))
                 for i, r in enumerate(runs) if r["seed"] in scratch]
        gain = (f"{np.mean(gains):+.4f}" if gains and variant != "none (scratch)" else "—")
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {mean_std(means)} | {gain} |")
    return "\n".join(lines)


def markdown(config: BenchConfig, results: dict) -> str:
    """The README section: setup, tables, reading."""
    lines = [
        START,
        "## User models: self-supervised pretraining (`benchmarks/user_models.py`)",
        "",
        "Command: `.venv/bin/python benchmarks/user_models.py`. Machine: "
        f"{results['machine']} (other jobs may share this machine). Wall time "
        f"{results['seconds'] / 60:.0f} min.",
        "",
        f"Setup: simulator {config.users} users × {config.days} days (world seed "
        f"{config.world_seed}); seeds {list(config.seeds)}; encoder D={config.embedding_dim}, "
        f"2 layers, 2 heads; {config.steps} pretraining steps × {config.batch_size} users for "
        "every method (AdaptSSR: first half MIP warm start, as the authors do); augmentation "
        "rates crop 0.6 / mask 0.3 / reorder 0.3 (`AugmentConfig` defaults, chosen on the "
        "separate development world 7); rankers MMoE "
        f"(defaults), {config.ranker_epochs} epoch(s), test-day AUC; mean ± std over seeds.",
        "",
        "### Linear probes of frozen user vectors (simulator, held-out 30% of users)",
        "",
        probe_table(results["probes"], (*config.methods, *config.ablations)),
        "",
    ]
    for dataset in ("simulator", "kuairand"):
        for fraction in config.fractions:
            table = ranker_table(results["rankers"], dataset, fraction)
            if table:
                lines += [f"### Ranker test AUC — {dataset}, {fraction:.0%} of the labelled "
                          "training rows", "", table, ""]
    lines += [f"- {note}" for note in results["notes"]]
    lines += ["", END]
    return "\n".join(lines)


def write_readme(section: str) -> None:
    """Replace our marked section of benchmarks/README.md, or append it; nothing else."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        _, after = rest.split(END, 1)
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    README.write_text(text)


def machine_line(load_start: float) -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return (f"{os.cpu_count()} cores ({model}), no GPU, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s); load "
            f"average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


def run(config: BenchConfig, workdir: Path) -> dict:
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    notes: list[str] = []
    log("simulating and building examples")
    simulator = prepare_simulator(config, workdir)
    encoders = pretrain_encoders(config, simulator, (*config.methods, *config.ablations))
    probes = run_probes(config, simulator, encoders)
    rankers = run_rankers(config, simulator, encoders) if config.rankers else []
    kuairand = prepare_kuairand(config, workdir) if config.rankers else None
    if config.rankers and kuairand is None:
        notes.append(f"KuaiRand skipped: {config.kuairand or 'no path'} not found.")
    elif kuairand is not None:
        rankers += run_rankers(config, kuairand,
                               pretrain_encoders(config, kuairand, config.methods))
        notes.append("KuaiRand-1K: ingested with the kuairand adapter; 2 valid + 3 test days; "
                     f"AUC shown only for tasks with ≥ {MIN_POSITIVES} test positives.")
    return {
        "config": asdict(config),
        "machine": machine_line(load_start),
        "seconds": time.perf_counter() - started,
        "probes": probes,
        "rankers": rankers,
        "pretraining": [{"method": m, "seed": s, "seconds": e["seconds"], "final": e["final"]}
                        for (m, s), e in encoders.items()],
        "notes": notes,
    }


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke sizes: 600 users × 5 days, one seed, 120 steps")
    parser.add_argument("--users", type=int)
    parser.add_argument("--days", type=int)
    parser.add_argument("--world-seed", type=int,
                        help="simulator seed (the README numbers: 0; development: 7)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--steps", type=int, help="pretraining steps per method")
    parser.add_argument("--batch-size", type=int, help="pretraining users per step")
    parser.add_argument("--dim", type=int, help="encoder width D")
    parser.add_argument("--ranker-epochs", type=int)
    parser.add_argument("--fractions", type=float, nargs="+")
    parser.add_argument("--no-frozen", action="store_true", help="skip frozen-encoder rankers")
    parser.add_argument("--no-ablations", action="store_true",
                        help="skip the probe-only ablations (AdaptSSR without warm start)")
    parser.add_argument("--no-rankers", action="store_true", help="probes only")
    parser.add_argument("--kuairand", type=str, help=f"KuaiRand CSV (default {KUAIRAND_CSV})")
    parser.add_argument("--no-kuairand", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--workdir", type=Path, help="keep the workspaces here (default: tmp)")
    parser.add_argument("--json", type=Path, help="also write every number (per seed) here")
    parser.add_argument("--write-readme", action="store_true",
                        help="update our section of benchmarks/README.md")
    parser.add_argument("--from-results", type=Path,
                        help="render the tables of a saved results JSON (runs nothing)")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else BenchConfig()
    overrides = {
        "users": args.users, "days": args.days, "world_seed": args.world_seed,
        "steps": args.steps,
        "batch_size": args.batch_size, "embedding_dim": args.dim,
        "ranker_epochs": args.ranker_epochs, "threads": args.threads,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "methods": tuple(args.methods) if args.methods else None,
        "fractions": tuple(args.fractions) if args.fractions else None,
        "kuairand": args.kuairand,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_frozen:
        config = replace(config, frozen=False)
    if args.no_ablations:
        config = replace(config, ablations=())
    if args.no_rankers:
        config = replace(config, rankers=False)
    if args.no_kuairand:
        config = replace(config, kuairand=None)
    return config, args


def config_from_dict(data: dict) -> BenchConfig:
    tuples = ("seeds", "methods", "ablations", "fractions")
    return BenchConfig(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    if args.from_results:
        results = json.loads(args.from_results.read_text())
        section = markdown(config_from_dict(results["config"]), results)
        print(section)
        if args.write_readme:
            write_readme(section)
        return 0
    log(f"config: {asdict(config)}")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run(config, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="recpipe-user-models-") as tmp:
            results = run(config, Path(tmp))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
        log(f"results → {args.json}")
    section = markdown(config, results)
    print(section)
    if args.write_readme:
        write_readme(section)
        log(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
