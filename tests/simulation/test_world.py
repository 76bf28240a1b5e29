"""The world: one item id space, plausible items, and demographics visible in behaviour."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl

from simulation.schemas import ITEM_SCHEMA, USER_SCHEMA
from simulation.simulator import simulate
from simulation.world import generate_world


def test_items_share_one_id_space_with_lives_last(logged, small_config):
    items = logged.items
    assert list(items.schema.items()) == list(ITEM_SCHEMA.items())
    assert items["item_id"].to_list() == list(range(small_config.n_videos + small_config.n_lives))
    lives = items.filter(pl.col("item_type") == "live")
    videos = items.filter(pl.col("item_type") == "video")
    assert lives["item_id"].min() == small_config.n_videos == videos.height
    assert videos["duration_s"].min() >= 5 and videos["duration_s"].max() <= 300
    assert lives["on_air_hours"].min() >= 2 and lives["on_air_hours"].max() <= 6
    assert videos["on_air_hours"].null_count() == videos.height


def test_users_frame_holds_the_hidden_attributes(logged, small_config):
    users = logged.users
    assert list(users.schema.items()) == list(USER_SCHEMA.items())
    assert users.height == small_config.n_users
    assert set(users["age_bucket"].unique()) == set(range(5))
    assert set(users["gender"].unique()) == {0, 1}
    assert set(users["activity_group"].unique()) == {0, 1, 2}


def test_videos_mostly_follow_their_authors_main_topic(small_config):
    world = generate_world(small_config)
    on_topic = world.video_topic == world.author_topic[world.video_author]
    assert 0.75 < on_topic.mean() < 0.9


def test_demographics_are_recoverable_from_clicked_topics(small_config):
    cfg = replace(small_config, n_users=1000, days=4)
    result = simulate(cfg)
    clicks = (result.events.filter(pl.col("item_type") == "video", pl.col("click") == 1)
              .join(result.items.select("item_id", "topic"), on="item_id"))
    shares = np.zeros((cfg.n_users, cfg.n_topics))
    np.add.at(shares, (clicks["user_id"].to_numpy(), clicks["topic"].to_numpy()), 1.0)
    shares /= np.maximum(shares.sum(axis=1, keepdims=True), 1.0)
    train = np.arange(cfg.n_users) % 2 == 0
    for column, k in (("age_bucket", 5), ("gender", 2)):
        y = result.users[column].to_numpy()
        centroids = np.stack([shares[train & (y == c)].mean(axis=0) for c in range(k)])
        dist = ((shares[~train, None, :] - centroids[None]) ** 2).sum(axis=-1)
        accuracy = np.mean(np.argmin(dist, axis=1) == y[~train])
        chance = np.bincount(y[~train]).max() / (~train).sum()
        assert accuracy > chance + 0.1, (column, accuracy, chance)
