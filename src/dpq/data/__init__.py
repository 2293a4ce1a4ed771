"""Datasets, protocol splits and label embeddings.

Every image loader returns an ``ImageDataset``: ``images`` uint8 (N, H, W, 3) (or an
``ImageFileReader`` that decodes on access), ``labels`` int64 (N,) or uint8 (N, C)
multi-hot, ``classes`` the class names.
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
from dpq.data.features import FeatureDataset, load_features
from dpq.data.folders import load_image_folder
from dpq.data.info import DatasetInfo, describe_source, detect_source_kind
from dpq.data.labels import load_word_vectors
from dpq.data.lists import ListFile, load_list_file, read_list_file
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
    "Split",
    "describe_source",
    "detect_source_kind",
    "download_cifar10",
    "load_cifar10",
    "load_digits",
    "load_features",
    "load_image_folder",
    "load_list_file",
    "load_word_vectors",
    "read_list_file",
    "split_imagenet100",
    "split_nus_wide",
    "split_per_class",
]
