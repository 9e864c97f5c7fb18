"""nanorf/distributed.py: how a step's global batch splits into ranks and micro-steps."""

import pytest

from nanorf.config import TrainConfig
from nanorf.distributed import micro_batch_sizes


@pytest.mark.parametrize("batch, und, micro, world, want", [
    (64, 16, 0, 1, (1, 64, 16)),    # one rank, one micro-step: everything at once
    (64, 16, 0, 2, (1, 32, 8)),     # two ranks share each half
    (64, 16, 8, 2, (4, 8, 2)),      # 2 ranks x 4 micro-steps x 8 = 64; 16 und / (2 x 4) = 2
    (64, 16, 16, 1, (4, 16, 4)),
    (0, 16, 0, 2, (1, 0, 8)),       # stage 1: understanding only, one micro-step
])
def test_micro_batch_sizes_by_hand(batch, und, micro, world, want):
    t = TrainConfig(batch_size=batch, und_batch_size=und, micro_batch_size=micro)
    accum, mb, umb = micro_batch_sizes(t, world)
    assert (accum, mb, umb) == want
    assert accum * mb * world == batch and accum * umb * world == und   # the whole step, nothing dropped


@pytest.mark.parametrize("batch, und, micro, world", [
    (64, 16, 0, 3),      # 64 does not split into 3 ranks
    (64, 10, 8, 2),      # 10 understanding examples over 8 micro-batches
    (64, 16, 24, 1),     # micro-batches of 24 do not tile 64
    (0, 15, 0, 2),       # stage 1: 15 over 2 ranks
])
def test_micro_batch_sizes_reject_uneven_splits(batch, und, micro, world):
    t = TrainConfig(batch_size=batch, und_batch_size=und, micro_batch_size=micro)
    with pytest.raises(ValueError, match="must split"):
        micro_batch_sizes(t, world)
