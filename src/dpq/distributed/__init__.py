"""Beyond one machine, on the engines people already run (no scheduler of our own).

- :mod:`dpq.distributed.ray_encode`: encode a collection on a Ray cluster (Ray Data
  ``map_batches`` with one model per actor), code shards on disk, merged into one index.
- :mod:`dpq.distributed.ddp`: training under ``torchrun`` with DistributedDataParallel
  (process group from torchrun's environment, rank-0 decisions broadcast, collectives with
  timeouts).

Importing this package imports neither Ray nor torch; Ray is the optional extra
``dpq[distributed]``.
"""
