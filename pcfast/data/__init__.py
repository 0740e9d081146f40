"""CIFAR-10 reader, GPU-resident loader, preprocessing and the synthetic stand-in."""

from pcfast.data.cifar10 import (
    CLASSES,
    CIFAR10Error,
    CIFAR10Split,
    find_cifar10,
    load_cifar10,
    read_batch,
)
from pcfast.data.loader import DeviceLoader, random_crop
from pcfast.data.pipeline import DataBundle, build_data, split_validation
from pcfast.data.preprocess import PREPROCESSORS, ChannelNormalize, build_preprocessor
from pcfast.data.synthetic import make_synthetic

__all__ = [
    "CLASSES", "PREPROCESSORS", "CIFAR10Error", "CIFAR10Split", "ChannelNormalize", "DataBundle",
    "DeviceLoader", "build_data", "build_preprocessor", "find_cifar10", "load_cifar10",
    "make_synthetic", "random_crop", "read_batch", "split_validation",
]
