"""pixelrelay's compute path: messages, image I/O, storage and the three model stages.

Nothing here imports Celery or Redis; torch is imported only by the stage backends.
"""
