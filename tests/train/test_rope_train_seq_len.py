"""The records scale RoPE by TRAIN_SEQ_LEN (their ROPE_TRAIN_SEQ_LEN is read but never used); so does pgolf."""

from __future__ import annotations

import pytest

from pgolf.train.config import resolve


def test_train_seq_len_sets_the_scaling_length_of_a_scaling_preset():
    train, model = resolve("pr1493", env={"TRAIN_SEQ_LEN": "1024"})
    assert train.train_seq_len == 1024 and model.rope_train_seq_len == 1024
    train, model = resolve("pr1493", env={}, flags={"train_seq_len": 4096})
    assert model.rope_train_seq_len == 4096
    assert resolve("pr1493", env={})[1].rope_train_seq_len == 2048


def test_presets_without_scaling_keep_it_off():
    assert resolve("sota", env={"TRAIN_SEQ_LEN": "1024"})[1].rope_train_seq_len == 0


def test_pgolf_flag_still_sets_its_own_scaling_length():
    _, model = resolve("pr1493", env={"TRAIN_SEQ_LEN": "1024"}, flags={"rope_train_seq_len": 3000})
    assert model.rope_train_seq_len == 3000


def test_rope_train_seq_len_that_a_record_would_ignore_is_an_error():
    with pytest.raises(ValueError, match="ROPE_TRAIN_SEQ_LEN=4096 is read but never used.*TRAIN_SEQ_LEN"):
        resolve("pr1493", env={"ROPE_TRAIN_SEQ_LEN": "4096"})
    # a run command that sets both to the same value (as PR #2014's) is fine
    assert resolve("sota", env={"ROPE_TRAIN_SEQ_LEN": "3072", "TRAIN_SEQ_LEN": "3072"})[0].train_seq_len == 3072
