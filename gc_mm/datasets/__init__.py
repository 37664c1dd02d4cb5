"""Demo data: a generated COCO-format shapes dataset (needs mmdet)."""
from .shapes import CLASSES, make_shapes_dataset
from .shapes_dataset import ShapesDataset

__all__ = ['CLASSES', 'make_shapes_dataset', 'ShapesDataset']
