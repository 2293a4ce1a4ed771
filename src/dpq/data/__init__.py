"""Datasets, protocol splits and label embeddings.

:func:`load_source` reads every kind of labelled collection (digits, CIFAR-10, image
folders and zips, list files, precomputed features) into a :class:`Source`: ``inputs``
uint8 (N, H, W, 3) images (or an ``ImageFileReader`` that decodes on access, or float32
(N, F) features), ``labels`` int64 (N,) or uint8 (N, C) multi-hot, ``classes`` the names.
:class:`SourceSpec` holds those options as one JSON-ready value (``spec.load()``).
"""

from dpq.data.cifar10 import (
    CIFAR10_CLASSES,
    DatasetUnavailableError,
    download_cifar10,
    load_cifar10,
)
from dpq.data.dataset import ImageDataset, ImageFileReader
from dpq.data.decode import CorruptImageError, SkippedImagesWarning
from dpq.data.digits import load_digits
from dpq.data.features import FeatureDataset, load_features, read_array
from dpq.data.folders import load_image_folder
from dpq.data.info import DatasetInfo, describe_source
from dpq.data.labels import load_word_vectors, orthogonal_label_embeddings, resolve_word_vectors
from dpq.data.lists import ListFile, load_list_file, read_list_file
from dpq.data.sources import Source, detect_source_kind, load_source
from dpq.data.spec import SourceSpec
from dpq.data.splits import Split, split_imagenet100, split_nus_wide, split_per_class

__all__ = [
    "CIFAR10_CLASSES",
    "CorruptImageError",
    "DatasetInfo",
    "DatasetUnavailableError",
    "FeatureDataset",
    "ImageDataset",
    "ImageFileReader",
    "ListFile",
    "SkippedImagesWarning",
    "Source",
    "SourceSpec",
    "Split",
    "describe_source",
    "detect_source_kind",
    "download_cifar10",
    "load_cifar10",
    "load_digits",
    "load_features",
    "load_image_folder",
    "load_list_file",
    "load_source",
    "load_word_vectors",
    "orthogonal_label_embeddings",
    "read_array",
    "read_list_file",
    "resolve_word_vectors",
    "split_imagenet100",
    "split_nus_wide",
    "split_per_class",
]
