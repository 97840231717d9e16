"""Fixtures of the data tests: sample shards in the test S3 bucket (written once per
session) and the tiny model config whose sizes the stream produces."""

from __future__ import annotations

import uuid

import pytest

from kosmos_g.models.config import model_preset
from tests.conftest import BUCKET


@pytest.fixture(scope="session")
def sample_shards(stack_env) -> dict[str, str]:
    from kosmos_g.platform.data.samples import write_sample_shards

    return write_sample_shards(f"s3://{BUCKET}/data-samples-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def tiny_cfg():
    return model_preset("tiny")
