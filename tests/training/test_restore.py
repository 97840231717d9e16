"""A restarted worker group restores its checkpoint from S3: every worker must read files
that no other worker on the node rewrites or deletes meanwhile."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import ray.train

from kosmos_g.platform import storage
from kosmos_g.platform.train.loop import private_copy


def written_checkpoint(s3_prefix: str) -> ray.train.Checkpoint:
    storage.write_bytes(f"{s3_prefix}/ckpt/step_20/zero_pp_rank_0_mp_rank_00_optim_states.pt", b"o" * 4096)
    storage.write_text(f"{s3_prefix}/ckpt/trainer_state.json", '{"step": 20, "tag": "step_20"}')
    filesystem, path = storage.pyarrow_filesystem(f"{s3_prefix}/ckpt")
    return ray.train.Checkpoint(path, filesystem=filesystem)


def test_a_later_worker_never_rewrites_the_files_an_earlier_one_reads(s3_prefix):
    checkpoint = written_checkpoint(s3_prefix)
    with private_copy(checkpoint) as first:
        shard = Path(first, "step_20", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        written_at = shard.stat().st_mtime_ns
        time.sleep(0.05)  # a rewrite would show in the modification time
        # The second worker on the node arrives after the first one's download finished
        # (Ray's shared `as_directory` downloads again into the same directory here).
        with private_copy(checkpoint) as second:
            assert Path(second) != Path(first)
            assert Path(second, "trainer_state.json").read_text() == '{"step": 20, "tag": "step_20"}'
        assert shard.stat().st_mtime_ns == written_at
        assert shard.read_bytes() == b"o" * 4096  # and its leaving did not delete it
    assert not Path(first).exists()  # each copy goes with its reader


def test_the_shared_download_is_what_failed(s3_prefix):
    """Why `private_copy` exists: Ray's per-node `as_directory` rewrites a reader's files."""
    checkpoint = written_checkpoint(s3_prefix)
    with contextlib.ExitStack() as readers:
        first = readers.enter_context(checkpoint.as_directory())
        shard = Path(first, "step_20", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        written_at = shard.stat().st_mtime_ns
        time.sleep(0.05)
        second = readers.enter_context(checkpoint.as_directory())
        assert Path(second) == Path(first)
        assert shard.stat().st_mtime_ns != written_at
