"""Ingest of the real KuaiRand-1K random-exposure log (skipped when ../shared/data is absent)."""

from __future__ import annotations

import hashlib
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest

from features.contract import EVENT_SCHEMA
from features.ingest import ingest
from features.lake import scan_events

REPO_ROOT = Path(__file__).resolve().parents[2]
KUAIRAND_CSV = (
    REPO_ROOT / "../shared/data/kuairand-1k/log_random_4_22_to_5_08_1k.csv"
).resolve()

pytestmark = pytest.mark.skipif(
    not KUAIRAND_CSV.is_file(),
    reason=f"KuaiRand-1K log not found at {KUAIRAND_CSV} (see ../shared/data/README.md)",
)


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("kuairand")
    report = ingest("kuairand", KUAIRAND_CSV, root / "lake", root / "quarantine")
    return root, report


def test_every_row_is_accounted_for(ingested):
    _, report = ingested
    assert report.input_rows == 43_028
    assert (report.accepted, report.quarantined, report.duplicates) == (43_027, 0, 1)
    assert report.quarantine_reasons == {}
    first = date(2022, 4, 22)
    assert report.partitions == tuple(first + timedelta(days=i) for i in range(17))


def test_the_one_exact_duplicate_is_the_one_dropped(ingested):
    root, _ = ingested
    raw = pl.read_csv(KUAIRAND_CSV)
    twice = raw.filter(raw.is_duplicated()).unique()
    assert twice.height == 1 and twice.item(0, "user_id") == 940
    row = twice.row(0, named=True)
    event_id = f"kuairand-{row['user_id']}-{row['video_id']}-{row['time_ms']}"
    stored = scan_events(root / "lake").filter(pl.col("event_id") == event_id).collect()
    assert stored.height == 1


def test_labels_and_mapping_match_the_published_facts(ingested):
    root, _ = ingested
    frame = scan_events(root / "lake").collect()
    assert frame.schema == pl.Schema(EVENT_SCHEMA)
    assert frame.get_column("event_id").is_unique().all()
    assert frame.get_column("click").mean() == pytest.approx(0.174, abs=0.0005)
    assert frame.get_column("long_view").mean() == pytest.approx(0.084, abs=0.0005)
    assert (frame.get_column("like").sum(), frame.get_column("follow").sum()) == (239, 8)
    assert frame.get_column("gift").null_count() == frame.height, "gift not observed: null"
    assert frame.get_column("propensity").null_count() == frame.height
    assert set(frame.get_column("policy")) == {"kuairand-random"}
    assert (frame.get_column("user_id").n_unique(), frame.get_column("item_id").n_unique()) == (
        1_000, 7_388)


def test_reingest_leaves_the_lake_byte_identical(ingested):
    root, _ = ingested
    before = hashes(root)
    again = ingest("kuairand", KUAIRAND_CSV, root / "lake", root / "quarantine")
    assert hashes(root) == before
    assert (again.accepted, again.duplicates, again.duplicates_in_lake) == (0, 43_028, 43_027)
