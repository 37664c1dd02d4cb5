"""An independent float64 (numpy) implementation of the GC update rules,
written from ../shared/docs/gc_semantics.md, to check gc_mm against."""
import math

import numpy as np

SGD_NAMES = ('SGD_GC', 'SGD_GCC', 'SGDW_GC', 'SGDW_GCC')
ADAM_NAMES = ('Adam_GC', 'Adam_GCC', 'Adam_GC2', 'Adam_GCC2', 'AdamW_GC',
              'AdamW_GCC', 'AdamW_GC2', 'AdamW_GCC2')
ADAGRAD_NAMES = ('Adagrad_GC', 'Adagrad_GCC')
ALL_NAMES = SGD_NAMES + ADAM_NAMES + ADAGRAD_NAMES


def project(x, mode):
    """P: subtract each row's mean, for ndim > 1 ('conv_fc') or > 3."""
    if mode is None or x.ndim < {'conv_fc': 2, 'conv': 4}[mode]:
        return x
    rows = x.reshape(x.shape[0], -1)
    return (rows - rows.mean(axis=1, keepdims=True)).reshape(x.shape)


def default_mode(name):
    return 'conv' if 'GCC' in name else 'conv_fc'


class Reference:
    """One optimizer's rule over a list of float64 arrays."""

    def __init__(self, name, gc_mode='class', **hp):
        self.name = name
        self.mode = default_mode(name) if gc_mode == 'class' else gc_mode
        self.hp = hp
        self.state = {}

    def step(self, weights, grads):
        return [self._step(i, w, g) for i, (w, g) in enumerate(zip(
            weights, grads))]

    def _step(self, i, w, g):
        st = self.state.setdefault(i, {'t': 0})
        st['t'] += 1
        if self.name in SGD_NAMES:
            return self._sgd(st, w, g)
        if self.name in ADAM_NAMES:
            return self._adam(st, w, g)
        return self._adagrad(st, w, g)

    def _sgd(self, st, w, g):
        hp = self.hp
        lr, wd = hp['lr'], hp.get('weight_decay', 0.)
        mom, damp = hp.get('momentum', 0.), hp.get('dampening', 0.)
        decoupled = self.name.startswith('SGDW')
        d = project(g if decoupled else g + wd * w, self.mode)
        if mom:
            if st['t'] == 1:
                st['buf'] = d.copy()
            else:
                st['buf'] = mom * st['buf'] + (1 - damp) * d
            d = d + mom * st['buf'] if hp.get('nesterov') else st['buf']
        new = w - lr * d
        if decoupled:
            new = new - lr * wd * w
        return new

    def _adam(self, st, w, g):
        hp = self.hp
        lr, eps = hp['lr'], hp.get('eps', 1e-8)
        b1, b2 = hp.get('betas', (0.9, 0.999))
        wd = hp.get('weight_decay', 0.)
        t = st['t']
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        authors_adamw = self.name.startswith('AdamW')
        on_update = self.name.endswith('2')
        gm = g if authors_adamw else g + wd * w
        if not on_update:
            gm = project(gm, self.mode)
        st['m'] = b1 * st.get('m', 0.) + (1 - b1) * gm
        st['v'] = b2 * st.get('v', 0.) + (1 - b2) * gm * gm
        v = st['v']
        if hp.get('amsgrad'):
            st['vmax'] = np.maximum(st.get('vmax', 0.), st['v'])
            v = st['vmax']
        if authors_adamw:
            delta = lr * math.sqrt(bc2) / bc1 * (
                wd * w + st['m'] / (np.sqrt(v) + eps))
        else:
            delta = (lr / bc1) * st['m'] / (np.sqrt(v) / math.sqrt(bc2) + eps)
        if on_update:
            delta = project(delta, self.mode)
        return w - delta

    def _adagrad(self, st, w, g):
        hp = self.hp
        lr, wd = hp.get('lr', 0.01), hp.get('weight_decay', 0.)
        eps = hp.get('eps', 1e-10)
        gm = project(g + wd * w, self.mode)
        st['sum'] = st.get('sum', hp.get('initial_accumulator_value',
                                         0.)) + gm * gm
        clr = lr / (1 + (st['t'] - 1) * hp.get('lr_decay', 0.))
        return w - clr * gm / (np.sqrt(st['sum']) + eps)
