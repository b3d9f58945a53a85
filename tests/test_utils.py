"""pgolf.utils.distributed_session: the process group is closed however the block is left."""

import socket

import pytest
import torch.distributed as dist

from pgolf.utils import distributed_session


def _join_alone():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def test_a_completed_block_leaves_no_group_behind():
    _join_alone()
    with distributed_session():
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_a_failing_block_closes_the_group_and_keeps_its_error():
    _join_alone()
    with pytest.raises(ValueError, match="boom"):
        with distributed_session():
            raise ValueError("boom")
    assert not dist.is_initialized()


def test_without_a_group_the_block_just_runs():
    assert not dist.is_initialized()
    with distributed_session():
        pass
