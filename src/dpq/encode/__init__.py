"""How a model and items become an index: :func:`dpq.encode.job.encode_collection` (the one
encode path, settings in an :class:`~dpq.encode.job.EncodeSettings`), over
:func:`dpq.encode.build.build_index` (the encoding itself), :mod:`.shards` (a plan, shard
files in the index's own format, their merge) and :mod:`.ray` (where shards run)."""
