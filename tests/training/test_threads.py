"""The training thread keeps its intra-op threads; threads started after it (Ray Data's collation)
get `train.torch_threads_others`, so only one OpenMP team of the worker runs parallel ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run in a child process: the call changes the process-wide default that every later thread of
# this test session would start from. The loop runs in a thread of Ray Train's worker, as here.
PROBE = """
import json, sys, threading, torch
from kosmos_g.platform.train.loop import own_intra_op_threads

found = {}
def collate():  # what a Ray Data iterator thread does: a parallel op, then report its count
    torch.stack([torch.randn(3, 64, 64) for _ in range(64)]).sum()
    found["other"] = torch.get_num_threads()

def train_thread(threads, others):
    own_intra_op_threads(threads, others)
    other = threading.Thread(target=collate)
    other.start()
    other.join()
    torch.randn(256, 256) @ torch.randn(256, 256)
    found["step"] = torch.get_num_threads()

thread = threading.Thread(target=train_thread, args=(int(sys.argv[1]), int(sys.argv[2])))
thread.start()
thread.join()
print(json.dumps(found))
"""


@pytest.mark.parametrize(("threads", "others", "expected_other"), [(2, 1, 1), (2, 0, 2), (3, 2, 2)])
def test_the_step_keeps_its_threads_and_later_threads_get_others(threads, others, expected_other):
    out = subprocess.run([sys.executable, "-c", PROBE, str(threads), str(others)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"step": threads, "other": expected_other}

