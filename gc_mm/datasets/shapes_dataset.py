from typing import Optional

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS

from .shapes import CLASSES, make_shapes_dataset


@DATASETS.register_module()
class ShapesDataset(CocoDataset):
    """The generated shapes dataset (see :mod:`gc_mm.datasets.shapes`).

    A CocoDataset that first writes the data under ``data_root`` if it is not
    there yet, so a demo config runs on a fresh machine with no download.

    Args:
        generator (dict, optional): arguments of ``make_shapes_dataset``
            (num_train, num_val, height, width, max_instances, seed).
        **kwargs: the arguments of :class:`mmdet.datasets.CocoDataset`.
    """

    METAINFO = dict(
        classes=CLASSES,
        palette=[(220, 20, 60), (0, 128, 255), (60, 180, 75), (255, 180, 0)])

    def __init__(self, *args, generator: Optional[dict] = None, **kwargs):
        make_shapes_dataset(kwargs['data_root'], **(generator or {}))
        super().__init__(*args, **kwargs)
