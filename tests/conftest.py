from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY_DATA, ok, slm


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the tiny stdlib slice, prepared once through `slm prepare`."""
    data_dir = tmp_path_factory.mktemp("data")
    ok(slm("prepare", f"paths.data_dir={data_dir}", *TINY_DATA, cwd=data_dir))
    assert (data_dir / "tiny" / "meta.json").is_file()
    return data_dir


@pytest.fixture(scope="session")
def checkpointed_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with periodic checkpoints at steps 10 and 20 and last.ckpt at step 25 (a later
    step off their grid), for `slm dynamics` and `slm tokens`."""
    from tests.helpers import train

    run = tmp_path_factory.mktemp("checkpointed") / "run"
    train(run, tiny_data, "trainer.max_steps=25", "trainer.checkpoint_every_n_steps=10",
          "trainer.val_check_interval=25", cwd=tiny_data)
    return run
