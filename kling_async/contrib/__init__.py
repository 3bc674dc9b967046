"""Integrations with other systems, each behind an optional extra.

- :mod:`kling_async.contrib.redis` (``pip install '.[redis]'``): one
  account quota, one ledger and one callback endpoint shared by processes and
  hosts through Redis.
- :mod:`kling_async.contrib.arq` (``pip install '.[arq]'``): arq job
  functions for generation requests and a worker-settings helper wiring the
  shared limiter and ledger.
"""
