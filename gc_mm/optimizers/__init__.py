"""GC optimizers and Lookahead, registered in MMEngine's root OPTIMIZERS
registry."""
from .adagrad import Adagrad_GC, Adagrad_GCC
from .adam import (Adam_GC, Adam_GC2, Adam_GCC, Adam_GCC2, AdamW_GC,
                   AdamW_GC2, AdamW_GCC, AdamW_GCC2)
from .base import GCOptimizer
from .lookahead import Lookahead, inner_optimizer
from .radam import RAdam_GC, Ranger
from .sgd import SGD_GC, SGD_GCC, SGDW_GC, SGDW_GCC

__all__ = [
    'GCOptimizer', 'SGD_GC', 'SGD_GCC', 'SGDW_GC', 'SGDW_GCC', 'Adam_GC',
    'Adam_GCC', 'Adam_GC2', 'Adam_GCC2', 'AdamW_GC', 'AdamW_GCC', 'AdamW_GC2',
    'AdamW_GCC2', 'Adagrad_GC', 'Adagrad_GCC', 'RAdam_GC', 'Ranger',
    'Lookahead', 'inner_optimizer'
]
