"""The broker's visibility timeout outlasts the longest batch, or the settings are refused:
Redis would otherwise deliver a slow chunk a second time while the first still runs."""

from __future__ import annotations

import pytest

from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.workers.celery_app import create_app, time_limits


def test_unset_it_is_derived_from_the_longest_batch(redis_url):
    settings = Settings.from_env(redis_url=redis_url, item_budget_s=900, chunk_size=32, lease_s=60)
    longest = 900 * 32 + 2 * 60 + 60
    assert settings.longest_batch_s() == longest == time_limits(settings)[1]
    assert settings.visibility_s() == longest + 600
    app = create_app(settings)
    assert app.conf.broker_transport_options["visibility_timeout"] == longest + 600
    short = Settings.from_env(redis_url=redis_url, item_budget_s=10, chunk_size=4)
    assert short.visibility_s() == 7200  # never under two hours


def test_an_explicit_one_is_used_when_it_outlasts_the_batch_and_refused_when_not(redis_url):
    ok = Settings.from_env(redis_url=redis_url, item_budget_s=120, chunk_size=16, visibility_timeout_s=3600)
    assert ok.visibility_s() == 3600
    with pytest.raises(ConfigError) as err:
        Settings.from_env(redis_url=redis_url, visibility_timeout_s=7200)  # defaults: 600 s x 16 items
    assert "PIXELRELAY_VISIBILITY_TIMEOUT_S=7200" in str(err.value) and "9780" in str(err.value)
