"""BlockProjector: trak BasicProjector's matrix, drawn once; checked against trak itself and a dense matmul."""
import pytest
import torch
from trak.projectors import BasicProjector, ProjectionType

from diffattr.project import BLOCK_BYTES, MAX_BLOCK_COLUMNS, BlockProjector, block_columns, make_projector

CPU = torch.device("cpu")
P_DIM, SEED = 300, 42


@pytest.fixture
def grads():
    return torch.randn(5, P_DIM, generator=torch.Generator().manual_seed(0))


def assert_same(got, ref):
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def trak_basic(proj_dim, block_size, grads, seed=SEED):
    projector = BasicProjector(P_DIM, proj_dim, seed, ProjectionType.normal, CPU, block_size=block_size)
    return projector.project(grads.clone(), model_id=0)


@pytest.mark.parametrize("proj_dim,block_size", [(16, 16), (16, 4), (10, 4), (7, 3), (5, 1)])
def test_equals_trak_basic_projector(grads, proj_dim, block_size):
    """Every block (the last one partial when block_size does not divide k) is trak's matrix; only the
    matmul's summation order may differ (bit for bit when both use one torch thread)."""
    ours = BlockProjector(P_DIM, proj_dim, SEED, block_size, CPU)
    for _ in range(2):  # a second call uses the kept blocks
        assert_same(ours.project(grads), trak_basic(proj_dim, block_size, grads))


def test_one_block_equals_dense_matmul_with_a_seeded_normal_matrix(grads):
    """With one block, P is torch's Normal draw of shape (p, k) from the seed itself, unscaled."""
    proj_dim = 12
    dense = torch.empty(P_DIM, proj_dim).normal_(generator=torch.Generator().manual_seed(SEED))
    got = BlockProjector(P_DIM, proj_dim, SEED, proj_dim, CPU).project(grads)
    torch.testing.assert_close(got.double(), grads.double() @ dense.double(), rtol=1e-5, atol=1e-5)
    assert abs(dense.std().item() - 1.0) < 0.05  # no 1/sqrt(k) scaling


@pytest.mark.parametrize("cache_bytes", [0, 4 * P_DIM * 4, 4 * P_DIM * 4 * 3, 1 << 30])
@pytest.mark.parametrize("threads", [1, 3])
def test_kept_blocks_and_threads_change_nothing(grads, cache_bytes, threads):
    """Memory bound (blocks kept: none, one, three, all four) and thread count do not change values."""
    full = BlockProjector(P_DIM, 16, SEED, 4, CPU, cache_bytes=1 << 30, threads=1).project(grads)
    bounded = BlockProjector(P_DIM, 16, SEED, 4, CPU, cache_bytes=cache_bytes, threads=threads)
    assert len(bounded.cached) == min(4, cache_bytes // (4 * P_DIM * 4))
    assert torch.equal(bounded.project(grads), full)
    assert torch.equal(bounded.project(grads), full)


def test_seed_reproducible_and_seed_dependent(grads):
    first = BlockProjector(P_DIM, 16, SEED, 4, CPU).project(grads)
    again = BlockProjector(P_DIM, 16, SEED, 4, CPU).project(grads)
    other = BlockProjector(P_DIM, 16, SEED + 1, 4, CPU).project(grads)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_rows_are_projected_independently(grads):
    projector = BlockProjector(P_DIM, 16, SEED, 4, CPU)
    whole = projector.project(grads)
    for i in range(len(grads)):
        torch.testing.assert_close(projector.project(grads[i:i + 1])[0], whole[i], rtol=1e-5, atol=1e-5)


def test_block_columns_bound_block_memory():
    assert block_columns(40_000, 4096) == MAX_BLOCK_COLUMNS
    assert block_columns(40_000, 64) == 64
    assert block_columns(35_700_000, 32768) == 1  # one column is the smallest block
    big = 2_000_000
    assert 4 * big * block_columns(big, 4096) <= BLOCK_BYTES


def test_make_projector_records_the_matrix_identity(grads):
    projector, info = make_projector(P_DIM, 16, SEED, CPU, 8)
    assert info == {"proj_dim": 16, "proj_seed": SEED, "proj_type": "normal", "grad_dim": P_DIM,
                    "projector": "BasicProjector", "block_size": 16}
    assert_same(projector.project(grads, model_id=0), trak_basic(16, 16, grads))


def test_bad_input_is_refused(grads):
    projector = BlockProjector(P_DIM, 16, SEED, 4, CPU)
    with pytest.raises(ValueError, match="grad_dim=300"):
        projector.project(grads[:, :-1])
    with pytest.raises(ValueError, match="model_id=1"):
        projector.project(grads, model_id=1)
    with pytest.raises(ValueError, match="block_size=17"):
        BlockProjector(P_DIM, 16, SEED, 17, CPU)
