import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_landscape import Objective, ParameterLayout
from lightning_landscape.examples import MLP, Classifier
from lightning_landscape.params import weight_decay_of
from tests.helpers import blobs, tiny_module_class


def mlp_and_data(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))
    data = blobs(40, seed=seed)
    batches = [(data.tensors[0][:24], data.tensors[1][:24]), (data.tensors[0][24:], data.tensors[1][24:])]
    return net, batches


def ce(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def exact_loss_fn(net, batches):
    """The objective written out by hand: size-weighted mean over batches, at a flat vector."""
    layout = ParameterLayout.from_module(net)
    x = torch.cat([b[0] for b in batches]).to(next(net.parameters()).dtype)
    y = torch.cat([b[1] for b in batches])

    def f(theta):
        params = layout.unflatten(theta)
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)

    return f


def test_loss_grad_hvp_match_dense_autograd():
    net, batches = mlp_and_data()
    obj = Objective(net, batches, ce, dtype=torch.float64)
    f = exact_loss_fn(net.double(), batches)
    theta = obj.theta0
    assert theta.dtype == torch.float64
    torch.testing.assert_close(obj.loss(theta), f(theta))
    torch.testing.assert_close(obj.grad(theta), torch.autograd.functional.jacobian(f, theta))
    hessian = torch.autograd.functional.hessian(f, theta)
    v = torch.randn_like(theta)
    torch.testing.assert_close(obj.hvp(theta, v), hessian @ v)


@pytest.mark.parametrize("per_parameter", [False, True])
def test_l2_term_adds_exactly_half_weight_decay_times_the_squared_norm(per_parameter):
    net, batches = mlp_and_data()
    f = exact_loss_fn(net.double(), batches)
    # one coefficient for all, or SGD's usual groups: decay on the weights, none on the biases
    groups = [
        {"params": [p for n, p in net.named_parameters() if n.endswith("weight")], "weight_decay": 0.3},
        {"params": [p for n, p in net.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
    ]
    l2 = weight_decay_of([torch.optim.SGD(groups, lr=0.1)], net) if per_parameter else 0.3
    obj = Objective(net, batches, ce, dtype=torch.float64, l2=l2)
    lam = l2 if per_parameter else torch.full((obj.numel,), 0.3, dtype=torch.float64)
    if per_parameter:  # the biases of both layers keep no decay
        slices = obj.layout.slices()
        assert set(lam[slices["0.bias"]].tolist()) == {0.0} and set(lam[slices["2.weight"]].tolist()) == {0.3}

    def energy(theta):
        return f(theta) + 0.5 * (lam * theta * theta).sum()

    theta = obj.theta0 + 0.1
    v = torch.randn_like(theta)
    torch.testing.assert_close(obj.loss(theta), energy(theta))
    torch.testing.assert_close(obj.grad(theta), torch.autograd.functional.jacobian(energy, theta))
    torch.testing.assert_close(obj.hvp(theta, v), torch.autograd.functional.hessian(f, theta) @ v + lam * v)
    points = torch.stack([theta, theta + v])  # the batched evaluation too
    torch.testing.assert_close(obj.losses(points), torch.stack([energy(p) for p in points]))
    # the coefficients travel with the metadata (per parameter name) and rebuild the same energy
    again = Objective(net, batches, ce, dtype=torch.float64)
    again.set_l2(obj.metadata["l2"])
    torch.testing.assert_close(again.loss(theta), obj.loss(theta))


@pytest.mark.parametrize("per_parameter", [False, True])
def test_vmapped_minibatch_losses_and_grads_equal_each_minibatch_energy(per_parameter):
    """The replicas' path (one vmapped forward, one backward, the L2 term added outside vmap, in chunks)."""
    net, _ = mlp_and_data()
    x, y = blobs(40, seed=1).tensors
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]  # batches of one shape stack, so the rows are vmapped
    l2 = torch.linspace(0.0, 0.5, sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    l2 = l2 if per_parameter else 0.3
    obj = Objective(net, batches, ce, dtype=torch.float64, l2=l2, chunk_size=2, batching="vmap")
    g = torch.Generator().manual_seed(0)
    rows = obj.theta0 + 0.3 * torch.randn(5, obj.numel, generator=g, dtype=torch.float64)
    chosen = [1, 0, 1, 1, 0]
    losses, grads = obj.minibatch_losses_and_grads(rows, chosen)
    assert obj._minibatch_method == "vmap"
    values, none = obj.minibatch_losses_and_grads(rows, chosen, with_grad=False)
    assert none is None
    for row, b, loss, value, grad in zip(rows, chosen, losses, values, grads, strict=True):
        f = exact_loss_fn(net.double(), [batches[b]])

        def energy(theta, f=f):
            return f(theta) + 0.5 * (l2 * theta * theta).sum()

        torch.testing.assert_close(loss, energy(row))
        torch.testing.assert_close(value, energy(row))
        torch.testing.assert_close(grad, torch.autograd.functional.jacobian(energy, row))


@pytest.mark.parametrize("tie", ["one module at two paths", "two modules sharing a weight"])
def test_tied_weights_stay_tied_and_the_module_keeps_its_parameters(tie):
    torch.manual_seed(0)
    first = nn.Linear(3, 3)
    second = first if tie == "one module at two paths" else nn.Linear(3, 3)
    second.weight = first.weight  # (a no-op for one module)
    net = nn.Sequential(first, nn.Tanh(), second)
    before = {n: (p, p.detach().clone()) for n, p in net.named_parameters(remove_duplicate=False)}
    x, y = blobs(40, seed=0).tensors
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    obj = Objective(net, batches, ce, dtype=torch.float64, batching="vmap")
    assert obj.numel == (12 if tie == "one module at two paths" else 15)

    def f(theta, rows=slice(None)):
        w, b1 = theta[:9].reshape(3, 3), theta[9:12]
        b2 = b1 if tie == "one module at two paths" else theta[12:]
        return F.cross_entropy(F.linear(torch.tanh(F.linear(x[rows].double(), w, b1)), w, b2), y[rows])

    theta = obj.theta0 + 0.2
    torch.testing.assert_close(obj.loss(theta), f(theta))
    torch.testing.assert_close(obj.grad(theta), torch.autograd.functional.jacobian(f, theta))
    losses, grads = obj.minibatch_losses_and_grads(torch.stack([theta, theta]), [0, 1])
    for b, rows in enumerate((slice(0, 20), slice(20, 40))):
        torch.testing.assert_close(losses[b], f(theta, rows))
        torch.testing.assert_close(grads[b], torch.autograd.functional.jacobian(lambda t, r=rows: f(t, r), theta))
    for name, p in net.named_parameters(remove_duplicate=False):  # the same Parameter objects, unchanged
        assert p is before[name][0] and isinstance(p, nn.Parameter) and torch.equal(p, before[name][1])


def test_bad_l2_names_the_parameter():
    net, batches = mlp_and_data()
    with pytest.raises(ValueError, match="`l2` must be a finite number >= 0, got -1"):
        Objective(net, batches, ce, l2=-1.0)
    with pytest.raises(ValueError, match=r"`l2` must be a number or a \(\d+,\) tensor"):
        Objective(net, batches, ce, l2=torch.ones(3))


@pytest.mark.parametrize("free", [None, 1])
def test_cached_graph_products_equal_fresh_products(monkeypatch, free):
    """Every batch's graph cached, or (no room: ``free`` bytes) the first one only and the others recomputed."""
    from lightning_landscape.curvature import memory

    if free is not None:
        monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    net, batches = mlp_and_data()
    assert len(batches) > 1
    obj = Objective(net, batches, ce, dtype=torch.float64)
    theta = obj.theta0 + 0.1
    product = obj.hvp_at(theta)
    for _ in range(3):
        v = torch.randn(obj.numel, dtype=torch.float64)
        torch.testing.assert_close(product(v), obj.hvp(theta, v))


def test_batched_losses_equal_one_by_one_and_use_vmap():
    net, batches = mlp_and_data()
    thetas = 0.3 * torch.randn(7, sum(p.numel() for p in net.parameters()))
    for batching in ("vmap", "loop", "auto"):
        obj = Objective(net, batches, ce, chunk_size=3, batching=batching)
        batched = obj.losses(obj.theta0 + thetas)
        assert obj.metadata["batching"] in (("vmap", "loop") if batching == "auto" else (batching,))
        torch.testing.assert_close(batched, torch.stack([obj.loss(t) for t in obj.theta0 + thetas]))


def test_losses_fall_back_to_a_loop_when_the_loss_cannot_be_vmapped():
    net, batches = mlp_and_data()

    def loss_with_item(module, batch):
        loss = ce(module, batch)
        _ = loss.item()  # not allowed under vmap
        return loss

    obj = Objective(net, batches, loss_with_item, batching="vmap")
    thetas = obj.theta0 + 0.3 * torch.randn(4, obj.numel)
    with pytest.warns(UserWarning, match="cannot vmap"):
        out = obj.losses(thetas)
    assert obj.metadata["batching"] == "loop"
    torch.testing.assert_close(out, torch.stack([obj.loss(t) for t in thetas]))
    auto = Objective(net, batches, loss_with_item)  # "auto" picks the loop without complaint
    torch.testing.assert_close(auto.losses(thetas), out)
    assert auto.metadata["batching"] == "loop"


def test_objective_never_mutates_the_module():
    module = tiny_module_class()()
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x, y = blobs(32).tensors
    for bn_mode in ("eval", "train"):
        obj = Objective(module, [(x, y)], bn_mode=bn_mode)
        theta = obj.theta0 + 1.0
        obj.loss(theta), obj.grad(theta), obj.hvp(theta, theta), obj.losses(torch.stack([theta, theta]))
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in module.modules())
    assert all(p.grad is None for p in module.parameters())


def test_bn_mode_selects_running_or_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)  # far from the batch statistics
    x = torch.randn(16, 3)

    def mse(module, batch):
        return module(batch).pow(2).mean()

    eval_loss = Objective(net, [x], mse, bn_mode="eval").loss()
    train_loss = Objective(net, [x], mse, bn_mode="train").loss()
    with torch.no_grad():
        expected_eval = mse(net.eval(), x)
        expected_train = mse(net.train(), x)  # (updates running stats of this copy: fine, checked last)
    torch.testing.assert_close(eval_loss, expected_eval)
    torch.testing.assert_close(train_loss, expected_train)
    assert not torch.isclose(eval_loss, train_loss)


def test_syncbatchnorm_uses_its_own_batch_statistics_without_a_collective(tmp_path):
    """Under a process group, SyncBatchNorm in training mode all-reduces its batch statistics (on CPU it refuses:
    GPU only), which would pair unrelated forward passes of different ranks, or hang; the objective normalizes each
    batch by its own statistics instead, as BatchNorm does, for losses, gradients, HVPs, vmapped rows and outputs."""
    import copy

    import torch.distributed as dist

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    batches = [torch.randn(16, 3), torch.randn(16, 3)]

    def mse(module, batch):
        return module(batch).pow(2).mean()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm"):  # the synchronizing path is the one taken
            sync.train()(batches[0])
        ours, reference = (
            Objective(sync, batches, mse, bn_mode="train"),
            Objective(plain, batches, mse, bn_mode="train"),
        )
        theta = ours.theta0 + 0.1
        torch.testing.assert_close(ours.loss(theta), reference.loss(theta), rtol=0, atol=0)
        torch.testing.assert_close(ours.grad(theta), reference.grad(theta), rtol=0, atol=0)
        v = torch.randn(ours.numel)
        torch.testing.assert_close(ours.hvp(theta, v), reference.hvp(theta, v), rtol=0, atol=0)
        rows = torch.stack([theta, ours.theta0])
        for objective in (ours, reference):
            objective.batching = "vmap"
        torch.testing.assert_close(
            ours.minibatch_losses_and_grads(rows, [0, 1]), reference.minibatch_losses_and_grads(rows, [0, 1])
        )
        torch.testing.assert_close(ours.outputs(theta), reference.outputs(theta), rtol=0, atol=0)
        assert "forward" not in vars(sync[1])  # restored afterwards
    finally:
        dist.destroy_process_group()


def test_dropout_is_off_unless_asked():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 64), nn.Dropout(0.5), nn.Linear(64, 1)).train()
    x = torch.randn(8, 3)
    obj = Objective(net, [x], lambda m, b: m(b).sum())
    assert obj.loss() == obj.loss()
    noisy = Objective(net, [x], lambda m, b: m(b).sum(), dropout=True)
    assert noisy.loss() != noisy.loss()
    assert obj.metadata["dropout"] is False and obj.metadata["bn_mode"] == "eval"


def test_default_loss_is_the_training_step_loss_with_logging_muted():
    calls = []

    class Recording(Classifier):
        def log_dict(self, *args, **kwargs):
            calls.append(args)

    model = Recording(MLP(3, 3, hidden=[5]))
    x, y = blobs(20).tensors
    obj = Objective(model, [(x, y)])
    torch.testing.assert_close(obj.loss(), F.cross_entropy(model(x), y))
    obj.grad(), obj.losses(torch.stack([obj.theta0]))
    assert calls == []
    model.log_dict({})  # logging is restored afterwards
    assert len(calls) == 1


def test_works_under_inference_mode_like_a_validation_hook():
    net, batches = mlp_and_data()
    with torch.inference_mode():
        obj = Objective(net, batches, ce)
        g = obj.grad()
        hv = obj.hvp(None, torch.ones(obj.numel))
    assert g.abs().sum() > 0 and hv.abs().sum() > 0


def test_frozen_parameters_are_constants():
    net, batches = mlp_and_data()
    net[0].weight.requires_grad_(False)
    obj = Objective(net, batches, ce)
    assert obj.numel == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert ParameterLayout.from_module(net).names == ("0.bias", "2.weight", "2.bias")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss_fn": lambda m, b: m(b[0])}, ValueError, "scalar loss.*HINT"),
        ({"loss_fn": lambda m, b: "loss"}, TypeError, "not a loss tensor"),
        ({"loss_fn": ce, "bn_mode": "batch"}, ValueError, "`bn_mode`"),
        ({"loss_fn": ce, "dtype": torch.float16}, ValueError, "`dtype`"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, error, match):
    net, batches = mlp_and_data()
    with pytest.raises(error, match=match):
        Objective(net, batches, **kwargs)


def test_module_without_trainable_parameters_is_rejected():
    net, batches = mlp_and_data()
    net.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters.*HINT"):
        Objective(net, batches, ce)


def test_missing_loss_and_empty_batches_are_rejected():
    net, batches = mlp_and_data()
    with pytest.raises(TypeError, match=r"no `training_step`.*loss_fn"):
        Objective(net, batches)
    with pytest.raises(ValueError, match="non-empty list of batches"):
        Objective(net, [], ce)
    with pytest.raises(ValueError, match="shape"):
        Objective(net, batches, ce).loss(torch.zeros(3))


def test_the_float64_twin_evaluates_the_same_energy_and_counts_its_passes_with_the_original():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    batches = [(torch.randn(16, 3), torch.randint(0, 2, (16,))) for _ in range(2)]
    objective = Objective(net, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), l2=0.1)
    twin = objective.in_dtype(torch.float64)
    assert twin is objective.in_dtype(torch.float64) and objective.in_dtype(torch.float32) is objective
    theta = objective.theta0.double()
    weights = objective.layout.unflatten(theta)
    exact = sum(0.5 * F.cross_entropy(torch.func.functional_call(net, weights, (x.double(),)), y) for x, y in batches)
    exact = exact + 0.05 * (theta**2).sum()
    assert twin.loss(theta).dtype == torch.float64 and float(twin.loss(theta)) == pytest.approx(float(exact), rel=1e-12)
    before = objective.passes["forward"]
    twin.loss_and_grad(theta)
    assert objective.passes["forward"] == before + 2  # one budget for both
    objective.set_l2(0.0)  # a changed energy: a fresh twin
    assert objective.in_dtype(torch.float64) is not twin
    assert float(objective.in_dtype(torch.float64).loss(theta)) == pytest.approx(float(exact - 0.05 * (theta**2).sum()))
