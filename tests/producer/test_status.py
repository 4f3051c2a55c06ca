"""The progress line: counts, bar, rate and ETA."""

from pixelrelay.producer.status import progress_line
from pixelrelay.jobs.state import Counts


def test_progress_line_shows_counts_rate_and_eta():
    line = progress_line(Counts(total=200, done=90, failed=10), rate=5.0, width=10)
    assert "[#####-----]" in line and "50.0%" in line
    assert "done 90" in line and "failed 10" in line and "pending 100" in line
    assert "5.00 items/s" in line and "ETA 00:00:20" in line


def test_progress_line_without_rate_has_unknown_eta():
    assert "ETA --:--" in progress_line(Counts(total=3, done=0, failed=0), rate=0.0)
