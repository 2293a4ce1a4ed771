"""The network and its files: which backbone reads the images (:mod:`.backbones`), how
features become codes (:mod:`.quantizer`), the DPQ network that joins them
(:mod:`.network`), and how a model lives on disk (:mod:`.files`)."""
