import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape import preserve_state


def snapshot(net, opt):
    return (
        {k: v.clone() for k, v in net.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        [m.training for m in net.modules()],
        {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()},
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    )


def assert_same(a, b):
    sa, ga, ma, oa, pa = a
    sb, gb, mb, ob, pb = b
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
    assert ma == mb
    assert oa.keys() == ob.keys()
    for key in oa:
        assert oa[key].keys() == ob[key].keys()
        assert all(torch.equal(torch.as_tensor(oa[key][k]), torch.as_tensor(ob[key][k])) for k in oa[key])
    assert pa == pb


def make():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, 2))
    net[3].eval()  # mixed modes must survive
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net(torch.randn(8, 3)).sum().backward()
    opt.step()
    net[0].weight.grad = None  # a mix of None and real gradients
    return net, opt


@pytest.mark.parametrize("raise_inside", [False, True])
def test_everything_is_restored_bit_exactly(raise_inside):
    net, opt = make()
    before = snapshot(net, opt)
    rng_before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with pytest.raises(RuntimeError) if raise_inside else torch.no_grad(), preserve_state(net, [opt]):
        net.train()(torch.randn(16, 3)).sum()  # BatchNorm statistics and num_batches_tracked move
        with torch.enable_grad():
            net(torch.randn(16, 3)).sum().backward()
        opt.step()
        opt.param_groups[0]["lr"] = 1.0
        opt.param_groups[0]["extra"] = 1
        net[1].running_mean = torch.zeros(4)  # rebinding a buffer
        random.random(), np.random.rand()
        if raise_inside:
            raise RuntimeError("boom")
    assert_same(before, snapshot(net, opt))
    assert random.getstate() == rng_before[0]
    assert np.array_equal(np.random.get_state()[1], rng_before[1])
    assert torch.equal(torch.get_rng_state(), rng_before[2])


def test_state_created_inside_is_removed():
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with preserve_state(net, [opt]):
        net(torch.ones(1, 2)).sum().backward()
        opt.step()  # creates momentum buffers
    assert len(opt.state) == 0
    assert all(p.grad is None for p in net.parameters())


def test_parameter_objects_keep_their_identity():
    net, opt = make()
    ids = [id(p) for p in net.parameters()]
    with preserve_state(net, [opt]), torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert ids == [id(p) for p in net.parameters()]
    assert opt.param_groups[0]["params"][0] is next(net.parameters())
