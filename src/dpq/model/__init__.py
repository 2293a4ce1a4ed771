"""The network and its files: which backbone reads the images (:mod:`.backbones`, the
registry; :mod:`.imagenet`, the ImageNet networks and their pretrained weights), what every
method's network shares (:mod:`.retrieval_network`), how features become codes
(:mod:`.quantizer`), the DPQ network that joins them (:mod:`.network`), and how a model lives
on disk (:mod:`.files`)."""
