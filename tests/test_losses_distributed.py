"""Distributed (gloo, W = 2 and 3) SimCLR / multi-crop losses against the single-process float64 oracle.

Every rank holds different images: the global view-major batch is built once (same seed on every rank), and
rank ``r`` takes images ``r*B .. (r+1)*B - 1`` with all their crops in crop-major order. A linear layer with the
same weights on every rank maps inputs to embeddings; after ``backward`` the weight gradients are averaged over
ranks (what DDP does) and compared, with the mean of the rank losses, to the oracle on the whole batch.
Tolerance: float64 throughout, ``rtol=1e-9`` (the gathered, rank-split sums and the DDP mean of the rank
gradients round differently from the oracle's loops: <~ 100 terms x |x| <= 1/T = 5 x u = 5e-14; 1e-9 leaves 1e4x
for the gradient's chain). Negative controls are O(0.1) off: their threshold 1e-2 is 1e7 above rounding. One spawn
per world size; all checks are bundled in it.
"""
import pytest
import torch
import torch.nn.functional as F

from dist_helpers import run_distributed
from references import oracle_info_nce
from scaleclr.distributed.gather import all_gather_no_grad, gather_with_grad, world_info
from scaleclr.losses import MulticropSimclrInfoNCELoss, SimclrInfoNCELoss, info_nce_dense, pair_columns

B, DIN, DOUT, T = 3, 6, 5, 0.2
SEED = 1234

pytestmark = pytest.mark.dist


def global_data(world, num_crops):
    """Global crop-major batch ``[C * W*B, DIN]`` (row ``c * W*B + n``) and weights ``[DIN, DOUT]``, float64."""
    g = torch.Generator().manual_seed(SEED + 10 * world + num_crops)
    x = torch.randn(num_crops * world * B, DIN, generator=g, dtype=torch.float64)
    w = torch.randn(DIN, DOUT, generator=g, dtype=torch.float64)
    return x, w


def shard(x, rank, world, num_crops):
    """Rank ``rank``'s images ``rank*B .. (rank+1)*B - 1``, all crops, crop-major: ``[C*B, DIN]``."""
    n_img = world * B
    idx = [c * n_img + rank * B + i for c in range(num_crops) for i in range(B)]
    return x[idx]


def _nograd_gather_loss(h, num_crops, rank):
    """Wrong variant for the negative control: other ranks' gathered rows detached (no gradient back)."""
    z = F.normalize(h, dim=1)
    L = z.shape[0]
    z_all = all_gather_no_grad(z)
    z_all = torch.cat([z_all[:rank * L], z, z_all[(rank + 1) * L:]])
    return info_nce_dense(z, z_all, temperature=T, num_crops=num_crops, rank=rank)


def _body(rank, world):
    out = {}
    assert world_info() == (rank, world)
    cases = {
        "simclr": (2, SimclrInfoNCELoss(T)),
        "mc_global": (3, MulticropSimclrInfoNCELoss(T, num_crops=3, negatives="global")),
        "mc_local": (3, MulticropSimclrInfoNCELoss(T, num_crops=3, negatives="local")),
        "simclr_nograd": (2, lambda h: _nograd_gather_loss(h, 2, rank)),
        "mc_global_nograd": (3, lambda h: _nograd_gather_loss(h, 3, rank)),
    }
    for name, (num_crops, loss_fn) in cases.items():
        x, w = global_data(world, num_crops)
        w = w.clone().requires_grad_()
        loss = loss_fn(shard(x, rank, world, num_crops) @ w)
        loss.backward()
        out[name] = (loss.detach(), w.grad)

    # gather_with_grad: rank-major order, backward = SUM over ranks of the gradient of this rank's slice.
    v = torch.arange(4.0, dtype=torch.float64).reshape(2, 2) + 10 * rank
    v.requires_grad_()
    gathered = gather_with_grad(v)
    weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape) * (rank + 1)
    (gathered * weights).sum().backward()
    out["gather"] = (gathered.detach(), v.grad, all_gather_no_grad(v))
    try:  # unequal shapes must raise on every rank (the check is collective)
        gather_with_grad(torch.zeros(2 + rank, 3))
        out["unequal"] = "no error"
    except ValueError as e:
        out["unequal"] = str(e)
    # Index selection actually used by the loss on this rank (spec test vector 8 for W=2, B=2).
    out["pos2"], out["same2"] = pair_columns(2, 2, world_info()[0])
    out["pos3"], out["same3"] = pair_columns(3, 2, world_info()[0])
    return out


def _oracle(world, num_crops, negatives):
    x, w = global_data(world, num_crops)
    w = w.clone().requires_grad_()
    loss = oracle_info_nce(x @ w, num_crops, T, ranks=world, negatives=negatives)
    loss.backward()
    return loss.detach(), w.grad


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_matches_single_process(world):
    res = run_distributed(_body, world)

    def ddp(name):
        return (torch.stack([r[name][0] for r in res]).mean(), torch.stack([r[name][1] for r in res]).mean(0))

    for name, num_crops, negatives in [("simclr", 2, "global"), ("mc_global", 3, "global"),
                                       ("mc_local", 3, "local")]:
        loss, grad = ddp(name)
        want_loss, want_grad = _oracle(world, num_crops, negatives)
        torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0, msg=name)
        torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12, msg=name)
        # data differs per rank: the per-rank losses are not all equal
        assert len({round(r[name][0].item(), 9) for r in res}) == world

    # local negatives really differ from global ones across ranks
    assert not torch.allclose(ddp("mc_local")[0], _oracle(world, 3, "global")[0])

    # Negative control: a gather without gradient gives the right loss value but a wrong gradient.
    for name, num_crops in [("simclr_nograd", 2), ("mc_global_nograd", 3)]:
        loss, grad = ddp(name)
        want_loss, want_grad = _oracle(world, num_crops, "global")
        torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0)
        rel = ((grad - want_grad).norm() / want_grad.norm()).item()
        assert rel > 1e-2, f"{name}: no-grad gather unexpectedly matched (rel err {rel:.2e})"
        with pytest.raises(AssertionError):
            torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-9)

    # gather_with_grad semantics
    for r, out in enumerate(res):
        gathered, grad, nograd = out["gather"]
        expected = torch.cat([torch.arange(4.0, dtype=torch.float64).reshape(2, 2) + 10 * q for q in range(world)])
        torch.testing.assert_close(gathered, expected)
        torch.testing.assert_close(nograd, expected)
        base = torch.arange(4.0 * world, dtype=torch.float64).reshape(2 * world, 2)[2 * r:2 * r + 2]
        torch.testing.assert_close(grad, base * sum(q + 1 for q in range(world)))   # sum over ranks
        assert "same tensor shape on every rank" in out["unequal"]

    if world == 2:  # spec test vector 8, rank 1, from the loss's own index selection
        pos2, same2 = res[1]["pos2"], res[1]["same2"]
        assert pos2[:, 0].tolist() == [6, 7, 4, 5]
        for k, own in enumerate([{5, 7}, {4, 6}, {5, 7}, {4, 6}]):
            negatives = set(range(8)) - set(same2[k].tolist())
            assert negatives == {0, 1, 2, 3} | own
        pos3, same3 = res[1]["pos3"], res[1]["same3"]
        assert pos3[:, 0].tolist() == [8, 9, 10, 11, 6, 7]
        assert pos3[:, 1].tolist() == [10, 11, 6, 7, 8, 9]
        local_neg = [set(range(6, 12)) - set(same3[k].tolist()) for k in range(6)]   # cols 0-5: none
        assert local_neg[0] == {7, 9, 11} and local_neg[1] == {6, 8, 10}
