"""Data sets of the paper: FashionMNIST (+ the 3/4 subset), CIFAR-10, Purchase-100, two moons.

Example:
  >>> from jaxshape import data
  >>> ds = data.load("two_moons", seed=0)
  >>> ds.x_train.shape, ds.x_test.shape
  ((700, 2), (300, 2))
"""

from jaxshape.data.dataset import DataFormatError
from jaxshape.data.dataset import DataNotFoundError
from jaxshape.data.dataset import Dataset
from jaxshape.data.registry import DATASETS
from jaxshape.data.registry import load
from jaxshape.data.two_moons import make_two_moons

__all__ = [
  "DATASETS",
  "DataFormatError",
  "DataNotFoundError",
  "Dataset",
  "load",
  "make_two_moons",
]
