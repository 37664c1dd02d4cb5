"""MSGDOptimWrapper: the gradient the optimizer applies is
sum_{r,i} w[r, i] g[r, i] / (R n) with the weights the message hub logged,
under gradient accumulation in one process and on two gloo DDP ranks;
seeded weights with the chosen mean and variance."""
import os
import pathlib

import pytest
import torch
import torch.multiprocessing as mp
from mmengine.hooks import Hook
from mmengine.optim import build_optim_wrapper

import gc_mm  # noqa: F401  (registers MSGDOptimWrapper)
from gc_mm.msgd import msgd_weights
from test_grad_stats import Pairs, Tiny, train

LR = 0.1


class AppliedGradients(Hook):
    """Records, at every optimizer step, the gradients it applies and the
    weights it starts from; after every iteration, the logged MSGD
    weights."""

    def __init__(self):
        self.steps = []  # (weights before, gradients) per optimizer step
        self.logged = {}  # iteration -> msgd_weights info

    def before_train(self, runner):
        model = getattr(runner.model, 'module', runner.model)

        def record(optimizer, args, kwargs):
            self.steps.append((
                {n: p.detach().clone() for n, p in model.named_parameters()},
                {n: p.grad.clone() for n, p in model.named_parameters()}))

        runner.optim_wrapper.optimizer.register_step_pre_hook(record)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.logged[runner.iter] = runner.message_hub.get_info('msgd_weights')


def micro_batch_gradient(weights, indices):
    """The gradient of Tiny's mean loss over the samples ``indices``, in
    float64, at ``weights``."""
    model, data = Tiny().double(), Pairs()
    model.load_state_dict({n: w.double() for n, w in weights.items()})
    model(data.inputs[indices].double(),
          data.targets[indices].double())['loss'].backward()
    return {n: p.grad for n, p in model.named_parameters()}


def expected(weights_before, micro_batches):
    """sum_i w_i g_i / N over (weight, sample indices) pairs."""
    total = None
    for weight, indices in micro_batches:
        grads = micro_batch_gradient(weights_before, indices)
        scaled = {n: weight * g for n, g in grads.items()}
        total = scaled if total is None else {
            n: total[n] + scaled[n] for n in total}
    return {n: g / len(micro_batches) for n, g in total.items()}


def check(got, want):
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name],
                                   rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize('distribution,variance', [('gaussian', 0.5),
                                                   ('bernoulli', 1.0)])
def test_accumulation_applies_the_weighted_sum(tmp_path, distribution,
                                               variance):
    """accumulative_counts=3 over 5 iterations (batch 2, samples in order):
    an update of 3 micro-batches, sum_i w_i g_i / 3, and the last one of
    the 2 left, sum_i w_i g_i / 2 (MMEngine's scaling of a remainder)."""
    hook = AppliedGradients()
    train(tmp_path, dict(type='MSGDOptimWrapper', variance=variance,
                         distribution=distribution, seed=7,
                         accumulative_counts=3,
                         optimizer=dict(type='SGD', lr=LR)),
          hook, max_iters=5)
    assert len(hook.steps) == 2
    saw_noise = False
    for update, (weights_before, grads) in enumerate(hook.steps):
        last = min(3 * update + 2, 4)  # the iteration of the update
        [logged] = hook.logged[last]  # one rank: 1 x 3
        assert [logged] == msgd_weights(7, update, 1, 3, variance,
                                        distribution).tolist()
        # The same weights were logged at each of the update's iterations.
        assert hook.logged[3 * update] == hook.logged[last] == [logged]
        saw_noise |= any(abs(w - 1) > 1e-3 for w in logged)
        micro = [(w, [2 * it, 2 * it + 1])
                 for w, it in zip(logged, range(3 * update, last + 1))]
        check(grads, expected(weights_before, micro))
    assert saw_noise


def test_weights_are_seeded_with_the_chosen_mean_and_variance():
    for distribution, variance in (('gaussian', 0.25), ('bernoulli', 3.0)):
        draws = torch.cat([
            msgd_weights(0, u, 4, 8, variance, distribution).flatten()
            for u in range(500)])
        # 16000 draws: mean within 4 standard errors, variance within 6%.
        assert abs(draws.mean() - 1) < 4 * (variance / draws.numel())**0.5
        assert abs(draws.var() / variance - 1) < 0.06
        if distribution == 'bernoulli':
            assert set(draws.unique().tolist()) == {0.0, 4.0}  # p = 1/4
    a, b = (msgd_weights(3, 5, 2, 4, 1.0, 'gaussian') for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, msgd_weights(3, 6, 2, 4, 1.0, 'gaussian'))
    assert not torch.equal(a, msgd_weights(4, 5, 2, 4, 1.0, 'gaussian'))
    # The global generators play no part (resume, other seeds).
    torch.manual_seed(123)
    assert torch.equal(a, msgd_weights(3, 5, 2, 4, 1.0, 'gaussian'))
    # Variance 0: no noise.
    for distribution in ('gaussian', 'bernoulli'):
        assert torch.equal(msgd_weights(0, 0, 2, 3, 0.0, distribution),
                           torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.parametrize('kwargs,match', [
    (dict(variance=-1.0), 'variance must be a finite number >= 0'),
    (dict(variance=float('nan')), 'variance must be a finite number'),
    (dict(variance=1.0, distribution='uniform'), 'distribution must be one'),
    (dict(variance=1.0, seed=-1), 'seed must be an int >= 0'),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optim_wrapper(torch.nn.Linear(2, 2), dict(
            type='MSGDOptimWrapper', optimizer=dict(type='SGD', lr=0.1),
            **kwargs))


def _train_on_rank(rank, folder):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.distributed.init_process_group(
        'gloo', init_method=f'file://{folder}/rendezvous', rank=rank,
        world_size=2)
    hook = AppliedGradients()
    train(pathlib.Path(folder) / 'work',
          dict(type='MSGDOptimWrapper', variance=1.0, seed=3,
               accumulative_counts=2, optimizer=dict(type='SGD', lr=LR)),
          hook, max_iters=4, launcher='pytorch')
    torch.save(dict(steps=hook.steps, logged=hook.logged),
               f'{folder}/rank{rank}.pth')
    torch.distributed.destroy_process_group()


def test_two_ddp_ranks_apply_the_weighted_sum(tmp_path):
    """Two gloo ranks, accumulative_counts=2, 4 iterations: each update
    applies sum over ranks r and micro-batches i of w[r, i] g[r, i] / 4,
    with the 2 x 2 weights both ranks logged. Rank r's micro-batch at
    iteration k holds samples r + 4b and r + 4b + 2, b = k mod 3
    (DefaultSampler without shuffling; 12 samples, 3 batches per rank and
    epoch)."""
    (tmp_path / 'work').mkdir()
    mp.spawn(_train_on_rank, args=(str(tmp_path), ), nprocs=2)
    ranks = [torch.load(tmp_path / f'rank{r}.pth', weights_only=True)
             for r in (0, 1)]
    assert ranks[0]['logged'] == ranks[1]['logged']
    assert len(ranks[0]['steps']) == 2
    for update, (weights_before, grads) in enumerate(ranks[0]['steps']):
        logged = ranks[0]['logged'][2 * update + 1]
        assert logged == msgd_weights(3, update, 2, 2, 1.0,
                                      'gaussian').tolist()
        micro = [(logged[r][i], [r + 4 * (k % 3), r + 4 * (k % 3) + 2])
                 for r in (0, 1)
                 for i, k in enumerate((2 * update, 2 * update + 1))]
        check(grads, expected(weights_before, micro))
        # Both ranks applied the same (all-reduced) gradient.
        for name, grad in ranks[1]['steps'][update][1].items():
            torch.testing.assert_close(grad, grads[name], rtol=0, atol=0)
