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
