"""The offline A/B as an MLflow evaluation run.

One parent run per comparison (experiment ``recpipe-evaluations``): params (models,
versions, gates), metrics (both models' values, the difference and its interval per
metric), the comparison table, the difference plot, the decision and its reasons (tags,
``decision.json``, ``report.md``). For rankers, each model also gets a nested run made by
``mlflow.models.evaluate`` on its static predictions, with our per-task metrics as custom
metrics, so the two models can be compared side by side in the MLflow UI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import mlflow
import numpy as np

from evaluation.ab import Decision, GateConfig, MetricTable, decision_markdown
from evaluation.metrics import auc, gauc, logloss
from features.schema import TaskSpec

EVALUATION_EXPERIMENT = "recpipe-evaluations"


def metric_key(*parts: str) -> str:
    """MLflow-safe metric name: ``click/gauc`` → ``click_gauc``."""
    return re.sub(r"[^0-9A-Za-z_.\- ]", "_", "_".join(parts))


def table_metrics(table: MetricTable) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in table.rows:
        base = metric_key(row.metric)
        values = {f"champion_{base}": row.champion, f"challenger_{base}": row.challenger,
                  f"diff_{base}": row.diff, f"diff_{base}_ci_low": row.ci_low,
                  f"diff_{base}_ci_high": row.ci_high, f"p_better_{base}": row.p_better}
        out.update({k: float(v) for k, v in values.items() if math.isfinite(v)})
    return out


def evaluate_predictions(labels: np.ndarray, predictions: np.ndarray,
                         user_ids: np.ndarray, tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """``mlflow.models.evaluate`` on static predictions (no model call) with one custom
    metric that reports AUC / GAUC / logloss per binary task; logs into the active run."""
    import pandas as pd
    from mlflow.metrics import MetricValue
    from mlflow.models import make_metric

    scores = predictions
    binary = [(k, t) for k, t in enumerate(tasks) if t.kind == "binary"]
    if not binary:
        return {}
    first_k = binary[0][0]

    def ranking(predictions, targets) -> MetricValue:  # noqa: ANN001 (MLflow passes Series)
        """Reads the closed-over arrays (all tasks), not MLflow's one-column inputs."""
        results = {}
        for k, task in binary:
            observed = np.isfinite(labels[:, k])
            y, p = labels[observed, k], scores[observed, k]
            results[f"{task.name}_auc"] = auc(y, p)
            results[f"{task.name}_gauc"] = gauc(y, p, user_ids[observed])
            results[f"{task.name}_logloss"] = logloss(y, p) if len(y) else float("nan")
        return MetricValue(aggregate_results={k: v for k, v in results.items()
                                              if math.isfinite(v)})

    frame = pd.DataFrame({"target": np.nan_to_num(labels[:, first_k]),
                          "prediction": predictions[:, first_k]})
    metric = make_metric(eval_fn=ranking, greater_is_better=True, name="ranking")
    result = mlflow.models.evaluate(data=frame, targets="target", predictions="prediction",
                                    model_type=None, extra_metrics=[metric])
    return dict(result.metrics)


def log_ab_run(experiment_id: str, model_name: str, champion_version: int,
               challenger_version: int, table: MetricTable, decision: Decision,
               gates: GateConfig, extra_params: dict | None = None,
               per_model: dict | None = None, tags: dict[str, str] | None = None) -> str:
    """Log the comparison and return the run id. ``per_model``: {"labels", "user_ids",
    "tasks", "champion", "challenger"} to add the nested ``mlflow.models.evaluate`` runs;
    ``tags``: more tags for the run (the flows add ``flows.lineage.lineage_tags``)."""
    from evaluation.ab_plots import difference_plot

    title = f"{model_name}: v{challenger_version} (challenger) vs v{champion_version} (champion)"
    run_name = f"ab {model_name} v{challenger_version} vs v{champion_version}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.set_tags({"recpipe.kind": "offline-ab", "model_name": model_name,
                         "champion_version": str(champion_version),
                         "challenger_version": str(challenger_version),
                         "decision": decision.status, "decision_reason": decision.summary[:5000],
                         "mlflow.note.content": decision_markdown(title, None, decision)})
        params = {"model_name": model_name, "champion_version": champion_version,
                  "challenger_version": challenger_version, "n_boot": table.n_boot,
                  "bootstrap_unit": table.unit, "level": table.level,
                  "gates.primary": gates.primary, "gates.min_improvement": gates.min_improvement,
                  "gates.primary_rule": gates.primary_rule, "gates.guard_rule": gates.guard_rule,
                  "gates.guards": "; ".join(f"{g.metric}<={g.tolerance:g}" for g in gates.guards),
                  "gates.limits": "; ".join(f"{g.metric}<={g.max_value:g}" for g in gates.limits),
                  **(extra_params or {})}
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        mlflow.log_metrics(table_metrics(table))
        mlflow.log_metric("promote", float(decision.promote))
        mlflow.log_table({"metric": [r.metric for r in table.rows],
                          "champion": [r.champion for r in table.rows],
                          "challenger": [r.challenger for r in table.rows],
                          "diff": [r.diff for r in table.rows],
                          "ci_low": [r.ci_low for r in table.rows],
                          "ci_high": [r.ci_high for r in table.rows],
                          "higher_is_better": [r.higher_is_better for r in table.rows],
                          "p_better": [r.p_better for r in table.rows]},
                         artifact_file="comparison.json")
        mlflow.log_dict({"decision": decision.to_dict(), "gates": gates.to_dict(),
                         "table": table.to_dict()}, "decision.json")
        mlflow.log_text(decision_markdown(title, table, decision, run.info.run_id), "report.md")
        if table.rows:
            figure = difference_plot(table, decision, gates, title)
            mlflow.log_figure(figure, "difference_plot.png")
            import matplotlib.pyplot as plt

            plt.close(figure)
        if per_model is not None:
            for role, version in (("champion", champion_version),
                                  ("challenger", challenger_version)):
                with mlflow.start_run(experiment_id=experiment_id, nested=True,
                                      run_name=f"{role} v{version}"):
                    mlflow.set_tags({"role": role, "model_version": str(version)})
                    evaluate_predictions(per_model["labels"], per_model[role],
                                         per_model["user_ids"], per_model["tasks"])
    return run.info.run_id
