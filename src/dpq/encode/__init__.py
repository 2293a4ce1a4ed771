"""How a model and items become an index: locally (:mod:`.build`), or in shards on a Ray
cluster (:mod:`.ray`)."""
