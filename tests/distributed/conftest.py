"""One two-process torchrun launch serves the FSDP2 and the Lightning pair tests (a launch costs
more than the runs it carries)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory) -> list[dict]:
    """Both ranks' results of ``pairs_job.py two-ranks``: FSDP2 plain and Lightning, pairs in Lightning."""
    from test_multiprocess import launch, torchrun_cmd

    out = tmp_path_factory.mktemp("two-ranks")
    return launch(torchrun_cmd("two-ranks", out, job=Path(__file__).with_name("pairs_job.py")), out)
