"""What every gc_mm optimizer shares: argument checks, the per-group GC
switch, the step loop, and float32 statistics for half-precision parameters.

A family module (sgd.py, adam.py, adagrad.py, radam.py) subclasses
:class:`GCOptimizer`, declares its hyper-parameter checks and implements
``_update_tensor`` (the per-tensor maths, the plain path) and, with a C++
kernel, ``_kernel_takes`` and ``_update_kernel``.
"""
from functools import partial
from itertools import chain
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import kernels
from ..centralize import (centralize_, check_gc_mode, check_output_layout,
                          is_centralized)
from ..sharding import check_sharded_group
from .fused import KERNEL_DTYPES, fast_path_takes, kernel_path

HALF_DTYPES = (torch.float16, torch.bfloat16)
# The dtypes every path can update. GC and the update rules are written for
# real tensors (a complex gradient would need |g|^2, not g*g).
SUPPORTED_DTYPES = (torch.float32, torch.float64) + HALF_DTYPES


class _ClassRule:
    """Default of ``gc_mode``: the rule the class name gives (GC or GCC)."""

    def __repr__(self):
        return "'conv_fc' for *_GC, 'conv' for *_GCC"


CLASS_RULE = _ClassRule()


def check_non_negative(group: dict, *names: str) -> None:
    for name in names:
        value = group[name]
        if name == 'lr' and torch.is_tensor(value):
            # torch's words (its test suite matches them): its optimizers
            # refuse a tensor lr where a path cannot take one.
            raise ValueError('lr as a Tensor is not supported by gc_mm\'s '
                             'optimizers (their paths take the learning rate '
                             f'as a Python number): give a float, got {value!r}')
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f'{name} must be a non-negative number, '
                             f'got {value!r}')


def check_betas(group: dict) -> None:
    betas = group['betas']
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1
                       for b in betas)):
        raise ValueError(f'betas must be two numbers in [0, 1), got {betas!r}')


def group_layout(group: dict) -> dict:
    """centralize_'s ``out_dim`` and ``groups`` for a param group: the
    transposed-conv layout GCOptimWrapperConstructor records in
    ``gc_out_dim``/``gc_groups`` (absent: rows along dim 0)."""
    return dict(out_dim=group.get('gc_out_dim', 0),
                groups=group.get('gc_groups', 1))


def centralize_group_(tensors: List[Tensor], group: dict) -> None:
    """Centralize ``tensors`` in place as a param group's GC says: its
    ``gc_mode`` and its :func:`group_layout`."""
    if group['gc_mode'] is not None:
        centralize_(tensors, conv_only=group['gc_mode'] == 'conv',
                    **group_layout(group))


def group_params(group: dict) -> List[Tensor]:
    """The tensors of a param group as given to ``add_param_group``: a
    tensor, or an iterable of tensors or of (name, tensor) pairs, as
    ``model.named_parameters()`` gives them."""
    params = group.get('params', [])
    params = [params] if torch.is_tensor(params) else list(params)
    return [p[1] if isinstance(p, tuple) else p for p in params]


class GCOptimizer(Optimizer):
    """Base class of the GC optimizers.

    Each param group carries ``gc_mode`` ('conv_fc', 'conv' or None), so a
    group (or an optim-wrapper constructor) can switch GC per layer. A
    subclass sets ``default_gc_mode`` and implements :meth:`_update_tensor`.
    What ``step()`` leaves in ``p.grad`` is each family's choice, stated in
    its module docstring and in README's table: a half-precision parameter
    always keeps what backward left (its maths runs on float32 copies).
    """

    default_gc_mode = 'conv_fc'
    # Whether the family updates sparse gradients (where GC is off), and
    # whether its weight decay is added to the gradient (then not to a
    # sparse one): see _check_sparse.
    supports_sparse = False
    coupled_decay = True
    # Group keys that choose a code path, not the maths; on load the
    # running optimizer's values win over the checkpoint's.
    path_options: tuple = ()
    # The family's C++ kernel (gc_mm/kernels/<kernel>.cpp), which a group's
    # ``fused=True`` asks for; with cuda_kernel, ``fused=True`` on CUDA
    # tensors asks for its Triton kernel (gc_mm/kernels/triton_<kernel>.py).
    kernel: Optional[str] = None
    cuda_kernel = False

    def __init__(self, params, defaults: dict):
        if defaults['gc_mode'] is CLASS_RULE:
            defaults['gc_mode'] = self.default_gc_mode
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        """Raise ValueError naming the first invalid hyper-parameter."""
        raise NotImplementedError

    def _check_options(self, group: dict) -> None:
        """Every check of a group's options (defaults filled in)."""
        self._check_group(group)
        check_gc_mode(group['gc_mode'])
        check_output_layout([p for p in group_params(group) if p.ndim > 1],
                            **group_layout(group))

    def add_param_group(self, param_group: dict) -> None:
        # Check the group as it will be used (defaults filled in) before it
        # is added, so a bad group leaves the optimizer unchanged; its
        # parameters, if given as an iterator, read once here (torch refuses
        # a set: left to it).
        params = param_group.get('params')
        if not (params is None or torch.is_tensor(params)
                or isinstance(params, (set, list))):
            param_group['params'] = list(params)
        self._check_options({**self.defaults, **param_group})
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        # The tensors given, against which DeepSpeed ZeRO-1/2's flat
        # partition, swapped in later, is found (_check_sharding).
        self.__dict__.setdefault('_gc_given', {}).update(
            (id(param), param) for param in group['params'])
        try:
            for param in group['params']:
                self._check_dtype(param, index)
                self._check_device(param, group, index)
            self._check_sharding(group, index)
        except (ValueError, RuntimeError):
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _check_dtype(self, param: Tensor, index: int) -> None:
        """Raise ValueError if no path can update ``param`` (complex, or
        another dtype than the four floating ones)."""
        grad = param.grad
        if param.dtype in SUPPORTED_DTYPES and (
                grad is None or grad.dtype in SUPPORTED_DTYPES):
            return  # the common case, per tensor and step: no loop
        for what, tensor in (('parameter', param), ('gradient', grad)):
            if tensor is not None and tensor.dtype not in SUPPORTED_DTYPES:
                raise ValueError(
                    f'{type(self).__name__} cannot update a {tensor.dtype} '
                    f'{what} (param group {index}, shape '
                    f'{tuple(param.shape)}): it updates float32, float64, '
                    'float16 and bfloat16 tensors only (GC and its update '
                    'rules are written for real numbers)')

    def _check_device(self, param: Tensor, group: dict, index: int) -> None:
        """Raise if ``fused=True`` asks for a kernel on a device that has
        none: the C++ kernels run on CPU tensors, SGD's Triton kernel on
        CUDA ones where triton is installed (as torch's fused optimizers
        refuse the devices they have no kernel for)."""
        if (self.kernel is None or group.get('fused') is not True
                or param.is_cpu):
            return
        if param.is_cuda and self.cuda_kernel:
            if kernels.triton_available():
                return
            why = 'its CUDA kernel needs triton, which is not installed'
        else:
            why = f'gc_mm has no {param.device.type} kernel yet'
        devices = ('CPU parameters and, with triton, CUDA ones'
                   if self.cuda_kernel else 'CPU parameters')
        raise RuntimeError(
            f'{type(self).__name__}(fused=True) runs on {devices} only '
            f'({why}); param group {index} has one on {param.device}. Use '
            'the default path (fused=None), which runs on any device.')

    def _check_sharding(self, group: dict, index: int) -> None:
        """Refuse, before anything moves, what GC cannot be exact on where
        the group's GC is on: the flat shards of FSDP1 and DeepSpeed
        ZeRO-1/2, DTensors whose shards split rows (gc_mm/sharding.py)."""
        gc_mode = group['gc_mode']
        if gc_mode is None:
            return
        check_sharded_group(
            group['params'], partial(is_centralized, gc_mode=gc_mode),
            type(self).__name__, index, group_layout(group)['out_dim'],
            given=self.__dict__.get('_gc_given'),
            names=group.get('param_names'))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A copy (deepcopy, unpickling) was given the tensors it holds; a
        # load_state_dict (which calls this too) keeps what was given.
        if '_gc_given' not in self.__dict__:
            self._gc_given = {
                id(param): param for group in self.param_groups
                for param in group['params']}
        # Groups loaded from an older checkpoint (or another optimizer's)
        # get the options they lack, e.g. gc_mode, from the defaults.
        # (torch's own 'differentiable', which it adds to defaults, stays
        # out of the groups, as in torch.)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != 'differentiable':
                    group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict, as torch does, with three differences: the
        loaded groups are checked like constructed ones (a bad one raises
        ValueError before anything changes); the running optimizer's
        :attr:`path_options` win over the checkpoint's; and each state
        tensor gets its parameter's layout (strides) and, for a
        half-precision parameter, float32."""
        saved_groups = state_dict['param_groups']
        # torch raises on a group count that differs; zip would hide it.
        if len(saved_groups) == len(self.param_groups):
            for index, (saved, group) in enumerate(
                    zip(saved_groups, self.param_groups)):
                try:
                    self._check_options(self._loaded_group(saved, group))
                except ValueError as error:
                    raise ValueError(
                        f'{type(self).__name__}.load_state_dict: param group '
                        f'{index} of the state dict: {error}') from None
        running = [{key: group[key] for key in self.path_options}
                   for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, options in zip(self.param_groups, running):
            group.update(options)
        saved_ids = chain.from_iterable(
            group['params'] for group in saved_groups)
        params = chain.from_iterable(
            group['params'] for group in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict['state'].get(saved_id, {}).items():
                if (key != 'step' and torch.is_tensor(value)
                        and value.is_floating_point()):
                    self.state[param][key] = self._like(param, value)

    def _loaded_group(self, saved: dict, group: dict) -> dict:
        """A checkpoint's group as it will be used once loaded."""
        loaded = {**self.defaults, **saved, 'params': group['params']}
        loaded.update({key: group[key] for key in self.path_options})
        return loaded

    @staticmethod
    def _like(param: Tensor, value: Tensor) -> Tensor:
        """``value`` (a loaded state tensor, or one made before ``param``
        changed layout) on ``param``'s device, in its layout and dtype
        (float32 for a half-precision parameter, so a resume is exact);
        ``value`` itself where it already is."""
        dtype = torch.float32 if param.dtype in HALF_DTYPES else param.dtype
        # not one entry per weight, or sparse (SGD's momentum of a sparse
        # gradient, as torch's): as torch
        if value.shape != param.shape or value.layout != torch.strided:
            return value.to(device=param.device, dtype=dtype)
        same_kind = value.dtype == dtype and value.device == param.device
        if same_kind and value.stride() == param.stride():
            return value
        # empty_like keeps a dense parameter's strides (channels_last or
        # any other order), the layout the fast paths expect of a buffer; a
        # parameter that is not dense gets contiguous state.
        relaid = torch.empty_like(param, dtype=dtype)
        if same_kind and relaid.stride() == value.stride():
            return value
        return relaid.copy_(value)

    def _check_param(self, param: Tensor, group: dict, index: int) -> None:
        """Raise if this step cannot update ``param`` (a parameter's dtype
        may have changed since it was added, e.g. by ``module.to``)."""
        if param.grad.is_sparse:
            self._check_sparse(param, group, index)
        self._check_dtype(param, index)
        self._check_device(param, group, index)
        if self.kernel is not None and group.get('fused'):
            # Built (or loaded) now, before any parameter moves.
            try:
                kernels.load(self.kernel)
            except RuntimeError as error:
                raise RuntimeError(f'{type(self).__name__} fused (C++ '
                                   f'kernel) path: {error}') from error

    def _check_sparse(self, param: Tensor, group: dict, index: int) -> None:
        """Raise unless this family updates ``param``'s sparse gradient as
        torch's counterpart does: the SGD and Adagrad families (as
        torch.optim.SGD and Adagrad), where GC is off for ``param`` and
        without coupled decay (torch cannot add it to a sparse gradient)."""
        where = (f'(param group {index}, shape {tuple(param.shape)})')
        name = type(self).__name__
        if not self.supports_sparse:
            raise RuntimeError(
                f'{name} does not support sparse gradients {where}, as '
                "torch's Adam and RAdam do not: of gc_mm's optimizers the "
                'SGD and Adagrad families take them, as torch.optim.SGD and '
                'Adagrad do')
        if is_centralized(param, group['gc_mode']):
            raise RuntimeError(
                f'{name} cannot centralize a sparse gradient {where}: GC '
                "subtracts each row's mean, which needs every entry of the "
                'row. Exclude the parameter from GC (e.g. an '
                'nn.Embedding(sparse=True)): paramwise_cfg.gc.exclude, or '
                'its own param group with gc_mode=None')
        if group['weight_decay'] and self.coupled_decay:
            raise RuntimeError(
                f'{name} cannot add weight_decay to a sparse gradient '
                f"{where}, as torch's SGD and Adagrad cannot: set "
                "weight_decay=0 for the parameter's group (or decay it "
                'decoupled, SGDW_*)')

    def _params_with_grad(self, group: dict) -> List[Tensor]:
        return [p for p in group['params'] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(group, self._params_with_grad(group))
                  for group in self.param_groups]
        # Refuse what the step cannot do before any parameter moves.
        for index, (group, params) in enumerate(groups):
            self._check_sharding(group, index)
            for param in params:
                self._check_param(param, group, index)
        for group, params in groups:
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: List[Tensor]) -> None:
        """The family's C++ kernel for the tensors it takes this step (one
        call for the group), the plain path for the others."""
        on_kernel, plain = self._split_for_kernel(group, params)
        if on_kernel:
            self._update_kernel(on_kernel, group)
        if plain:
            self._update_plain(group, plain)

    def _split_for_kernel(self, group: dict, params: List[Tensor]) -> tuple:
        """(the tensors the family's kernel takes this step, the others).
        The kernels centralize rows along dim 0: a group laid out otherwise
        (transposed convs per output unit) takes the other paths."""
        if (self.kernel is None or not kernel_path(group['fused'], self.kernel)
                or group_layout(group) != dict(out_dim=0, groups=1)):
            return [], params
        on_kernel, others = [], []
        for param in params:
            # Half precision keeps float32 state: the plain path.
            takes = (param.dtype in KERNEL_DTYPES and param.is_cpu
                     and not param.grad.is_sparse
                     and self._kernel_takes(param, group))
            (on_kernel if takes else others).append(param)
        return on_kernel, others

    def _kernel_takes(self, param: Tensor, group: dict) -> bool:
        """Whether the kernel makes this float32/float64 CPU tensor's
        step: its state made, then :meth:`_state_fits_kernel`."""
        raise NotImplementedError

    def _state_fits_kernel(self, param: Tensor, keys: tuple) -> bool:
        """Whether ``param``, its gradient and the state tensors ``keys``
        it has share a layout the kernel takes. State made before the
        parameter changed layout follows it first (checked before, as this
        runs per tensor and step and the layout rarely changes)."""
        state = self.state[param]
        keys = [key for key in keys if key in state]
        if fast_path_takes(param, param.grad, *(state[k] for k in keys)):
            return True
        for key in keys:
            state[key] = self._like(param, state[key])
        return fast_path_takes(param, param.grad, *(state[k] for k in keys))

    def _update_kernel(self, params: List[Tensor], group: dict) -> None:
        """The kernel's step of ``params``, one call."""
        raise NotImplementedError

    def _update_plain(self, group: dict, params: List[Tensor]) -> None:
        """The plain path: one tensor at a time, in the authors' order."""
        for param in params:
            state = self.state[param]
            if param.dtype in HALF_DTYPES:
                work = param.float()
                self._update_tensor(work, param.grad.float(), state, group)
                param.copy_(work)
            else:
                self._update_tensor(param, param.grad, state, group)

    def _update_tensor(self, param: Tensor, grad: Tensor,
                       state: Dict[str, Tensor], group: dict) -> None:
        raise NotImplementedError
