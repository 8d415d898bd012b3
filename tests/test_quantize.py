from __future__ import annotations

import pytest
import torch

from dsfuse.nn.quantize import FSQ, VectorQuantizer, fsq_levels, kmeans, nearest_codes


def test_nearest_codes_matches_brute_force_in_small_chunks():
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(1000, 8, generator=g), torch.randn(300, 8, generator=g)
    expected = torch.cdist(x, codebook).argmin(1)
    assert torch.equal(nearest_codes(x, codebook, chunk_rows=37), expected)
    assert torch.equal(nearest_codes(x, codebook), expected)


def _clusters(n_per: int, centres: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    points = centres.repeat_interleave(n_per, 0)
    return points + noise * torch.randn(points.shape, generator=g)


def test_kmeans_finds_separated_clusters():
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    found = kmeans(_clusters(50, centres, 0.1, seed=1), 4, iters=20, generator=torch.Generator().manual_seed(0))
    nearest = torch.cdist(centres, found).min(1).values
    assert nearest.max() < 0.2, found


def test_vq_ema_codebook_follows_the_data_and_straight_through_gradients():
    torch.manual_seed(0)
    centres = torch.randn(16, 4) * 4
    vq = VectorQuantizer(4, 16, decay=0.9).train()
    for step in range(30):
        out = vq(_clusters(20, centres, 0.05, seed=step))
    assert bool(vq.initialised)
    assert torch.cdist(centres, vq.codebook).min(1).values.max() < 0.1  # every centre has its code
    assert out.stats["usage"] == 1.0 and out.stats["perplexity"] > 15
    vq.eval()
    x = _clusters(3, centres, 0.05, seed=99).requires_grad_()
    z_q, indices, stats = vq(x)
    assert torch.allclose(z_q, vq.codebook[indices], atol=1e-6)
    assert torch.equal(vq.encode(x), indices)
    z_q.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))  # straight-through
    before = vq.codebook.clone()
    vq(x)
    assert torch.equal(before, vq.codebook), "eval mode must not update the codebook"


def test_vq_replaces_dead_codes_from_the_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 8, decay=0.5, kmeans_init=False).train()
    x = torch.randn(256, 2) * 0.1
    vq.codebook[3] = torch.tensor([100.0, 100.0])  # far from every input: never picked
    vq.embed_sum[3] = vq.codebook[3]
    for _ in range(3):
        vq(x)
    assert vq.codebook[3].abs().max() < 1.0, "the dead code was re-seeded from the batch"


def test_vq_cosine_codes_are_unit_vectors():
    vq = VectorQuantizer(6, 10, cosine=True).train()
    out = vq(torch.randn(4, 50, 6))
    assert torch.allclose(vq.codebook.norm(dim=-1), torch.ones(10), atol=1e-5)
    assert out.z_q.shape == (4, 50, 6) and out.indices.shape == (4, 50)


@pytest.mark.parametrize("size, levels", [(2**10, [8, 5, 5, 5]), (2**14, [8, 8, 8, 6, 5]), (8192, [8, 8, 8, 4, 4]),
                                          (512, [8, 8, 8]), (2**16, [8, 8, 8, 5, 5, 5]), (16, [4, 4])])
def test_fsq_levels(size, levels):
    assert fsq_levels(size) == levels


def test_fsq_levels_refuses_sizes_it_cannot_make():
    for bad in (1000, 3, 0):
        with pytest.raises(ValueError, match="power-of-two"):
            fsq_levels(bad)


def test_fsq_indices_cover_the_grid_and_round_trip():
    fsq = FSQ(dim=8, levels=[8, 5, 5, 5])
    all_ids = torch.arange(fsq.codebook_size)
    codes = fsq._indices_to_codes(all_ids)
    assert codes.abs().max() <= 1.0 and torch.equal(fsq._codes_to_indices(codes), all_ids)
    x = torch.randn(2, 30, 8) * 3
    z_q, indices, stats = fsq(x)
    assert indices.min() >= 0 and indices.max() < 1000
    assert torch.allclose(fsq.decode_indices(indices), z_q, atol=1e-6)
    assert torch.equal(fsq.encode(x), indices)


def test_fsq_rounds_in_fp32_under_autocast():
    torch.manual_seed(0)
    fsq = FSQ(dim=4, levels=[8, 8, 8, 4, 4])
    x = torch.randn(64, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = fsq(x.bfloat16())
    assert torch.equal(under_amp.indices, fsq.encode(x.bfloat16().float()))


def test_fsq_gradients_flow_straight_through():
    fsq = FSQ(dim=5, levels=[8, 8, 8, 4, 4])
    x = (torch.randn(10, 5) * 0.3).requires_grad_()
    fsq(x).z_q.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _ddp_worker(rank: int, world: int, port: int, data: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different local RNG: only the broadcasts keep the ranks equal
    synced = VectorQuantizer(3, 12, decay=0.8).train()  # k-means init, dead-code re-seeding
    plain = VectorQuantizer(3, 12, decay=0.8, kmeans_init=False, dead_code_fraction=0.0).train()
    plain.codebook.copy_(data[:12])
    plain.embed_sum.copy_(data[:12])
    shard = data.chunk(world)[rank]
    for step in range(4):
        for vq in (synced, plain):
            vq(shard + 0.01 * step)
    torch.save({"synced": synced.codebook, "plain": plain.codebook}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_all_reduces_codebook_statistics(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    mp.spawn(_ddp_worker, args=(2, port, data, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["synced"], ranks[1]["synced"]), "every rank holds the same codebook"
    single = VectorQuantizer(3, 12, decay=0.8, kmeans_init=False, dead_code_fraction=0.0).train()
    single.codebook.copy_(data[:12])
    single.embed_sum.copy_(data[:12])
    for step in range(4):
        single(data + 0.01 * step)
    assert torch.allclose(ranks[0]["plain"], single.codebook, atol=1e-5), "two shards update like one batch"
