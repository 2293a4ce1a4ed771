"""dpq: Deep Progressive Quantization (Gao et al., IJCAI 2019) for image retrieval.

One network whose last layers are L progressive quantization blocks of K codewords: the
first l codes of an item are a valid (l * log2 K)-bit code, so one model gives 8, 16, 24 and
32-bit codes at once. Search uses Asymmetric Quantization Distance with lookup tables.

Importing ``dpq`` does not import torch; ``dpq.index`` and ``dpq.metrics`` work with numpy
(and faiss) alone.
"""

__version__ = "0.1.0"
