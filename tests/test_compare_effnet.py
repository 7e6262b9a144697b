"""`lorax-cil compare` on the EfficientNet-Lite0 path: the same table as on the ViT path."""

from __future__ import annotations

import pytest
from test_compare import TASKS, base_config

from conftest import make_cddb_tree
from lorax_cil.training.compare import TABLE_METRICS, run_comparison


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=TASKS, n=4, size=(36, 36),
                          subclass_tasks=())


def test_efficientnet_path_gives_the_same_table_shape(data_root, tmp_path):
    """Every strategy but the ViT-only ones (l2p, lorax-mole, lorax-ca, lorax-side, lorax-distill)
    on the pretrained EfficientNet-Lite0."""
    from lorax_cil.training.registry import list_strategies

    vit_only = {"l2p", "lorax-mole", "lorax-ca", "lorax-side", "lorax-distill"}
    names = [s for s in list_strategies() if s not in vit_only]
    cfg = base_config(data_root, backbone="efficientnet-lite0", pretrained=True)
    result = run_comparison(cfg, strategies=names, seeds=[0], out=tmp_path, timing_images=4)
    assert list(result.table["strategy"]) == names
    assert list(result.table.columns) == ["strategy", "seeds"] + [
        f"{k}_{s}" for k, *_ in TABLE_METRICS for s in ("mean", "std")]
    assert "efficientnet-lite0 (pretrained)" in result.caption
    assert not result.table["aa_mean"].isna().any()
