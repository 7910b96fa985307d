"""``--bind-cores``: each DDP rank's share of the CPUs (``expcuda.train.distributed.core_share``)."""

from __future__ import annotations

import pytest

from expcuda.train.args import config_from_args, parser
from expcuda.train.distributed import core_share


def test_each_rank_gets_its_own_slice():
    cpus = {5, 1, 3, 7}
    assert [core_share(r, 2, 1, cpus) for r in range(2)] == [[1], [3]]
    assert [core_share(r, 2, 2, cpus) for r in range(2)] == [[1, 3], [5, 7]]
    assert [core_share(r, 2, None, cpus) for r in range(2)] == [[1, 3], [5, 7]]  # an equal share
    assert [core_share(r, 3, None, range(7)) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("ranks, threads, cpus", [(2, 2, range(3)), (3, None, range(2)), (2, 1, range(1))])
def test_too_few_cpus_is_an_error_that_says_so(ranks, threads, cpus):
    with pytest.raises(ValueError, match=r"--bind-cores: .* ranks x .* threads need \d+ CPUs"):
        core_share(0, ranks, threads, cpus)


def test_the_flag_reaches_the_config():
    assert config_from_args(parser().parse_args(["--preset", "fmnist"])).bind_cores is False
    assert config_from_args(parser().parse_args(["--preset", "fmnist", "--bind-cores"])).bind_cores is True
