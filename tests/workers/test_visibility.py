"""The broker's visibility timeout is a backstop, not a bound on a batch: unset it is fixed,
whatever the chunk size and item budget; a value set must outlast two leases and a minute
(renewals keep a leased message's delivery time fresh, ``workers.lease``)."""

from __future__ import annotations

import pytest

from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.workers.celery_app import create_app


def test_unset_it_is_the_default_whatever_the_chunk(redis_url):
    for budget, chunk in ((900, 32), (10, 4)):
        settings = Settings.from_env(redis_url=redis_url, item_budget_s=budget, chunk_size=chunk, lease_s=60)
        assert settings.visibility_s() == C.DEFAULT_VISIBILITY_TIMEOUT_S
    app = create_app(settings)
    assert app.conf.broker_transport_options["visibility_timeout"] == C.DEFAULT_VISIBILITY_TIMEOUT_S


def test_an_explicit_one_is_used_when_it_outlasts_two_leases_and_refused_when_not(redis_url):
    ok = Settings.from_env(redis_url=redis_url, item_budget_s=600, chunk_size=64, lease_s=5, visibility_timeout_s=71)
    assert ok.visibility_s() == 71  # far under the chunk's budget: renewals keep its message fresh
    with pytest.raises(ConfigError) as err:
        Settings.from_env(redis_url=redis_url, lease_s=60, visibility_timeout_s=180)
    assert "PIXELRELAY_VISIBILITY_TIMEOUT_S=180" in str(err.value) and "(180 s" in str(err.value)
