"""Job bookkeeping: what a job is made of and where each part lives. Storage holds the truth,
Redis a cache of it. Imports Redis and the compute path's messages and storage; never
Celery, never torch.
"""
