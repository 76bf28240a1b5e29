"""Two nights in one workspace: the first one's A/B is a clean no-op (same version), the
second (the same simulated world one day later, as a real night brings one more day of logs)
compares the new challenger with the first night's champion and decides."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.workspace import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_second_night_runs_the_ab_and_reports_it(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly

    workspace = Workspace(tmp_path / "ws")
    with prefect_test_harness(server_startup_timeout=90):
        first = nightly(home=str(workspace.root), users=120, days=4, seed=3, epochs=1)
        second = nightly(home=str(workspace.root), users=120, days=5, seed=3, epochs=1)
    # the same world: its first four days come again (dropped as duplicates), one is new
    assert second["ingest"]["duplicates_in_lake"] == first["ingest"]["accepted"]
    assert second["features"]["dates"]["test"] > first["features"]["dates"]["test"]
    assert first["ab"]["status"] == "same-version"
    assert "nothing to do" in first["ab"]["markdown"]
    ab = second["ab"]
    assert ab["challenger_version"] == 2 and ab["champion_version"] == 1
    assert ab["status"] in {"promoted", "kept-champion"}
    assert "Decision:" in ab["markdown"] and "click/gauc" in ab["markdown"]
    mlflow.set_tracking_uri(workspace.tracking_uri)
    run = MlflowClient().get_run(ab["run_id"])
    assert run.data.tags["decision"] in {"promote", "keep-champion"}
    champion = MlflowClient().get_model_version_by_alias("recpipe-ranker", "champion")
    assert int(champion.version) == (2 if ab["status"] == "promoted" else 1)
