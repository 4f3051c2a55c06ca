"""Submission, input listing, status and the ``pixelrelay`` CLI. Never imports torch."""
