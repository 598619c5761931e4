"""Audits on the Ray engine: the streamed Parquet data audit (Ray Data) and the shadow
models of membership inference give the same results as locally."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.xdist_group("ray")


def _shards(tmp: Path, x: np.ndarray, y: np.ndarray, n_shards: int = 3) -> Path:
    folder = tmp / "shards"
    folder.mkdir()
    flat = x.reshape(len(x), -1)
    for i, part in enumerate(np.array_split(np.arange(len(y)), n_shards)):
        df = pd.DataFrame(flat[part], columns=[f"p{j}" for j in range(flat.shape[1])])
        df["label"] = y[part]
        df.to_parquet(folder / f"part-{i:03d}.parquet", index=False)
    return folder


def test_streamed_data_audit_on_ray_equals_local(ray_cluster, digits_arrays, tmp_path) -> None:
    from _raymodels import zoo_digits_cnn

    from bastion.audit.stream import audit_data_stream
    from bastion.engine import get_engine

    x_tr, y_tr, _, _ = digits_arrays
    x, y = x_tr[:400], y_tr[:400].copy()
    flipped = np.arange(0, 400, 40)  # 10 noisy labels
    y[flipped] = (y[flipped] + 3) % 10
    folder = _shards(tmp_path, x, y)
    eng = get_engine("ray", ray_cluster.address)
    # data only: raw rows as features, exactly the same numbers
    local, _, s_loc = audit_data_stream(folder, batch_size=128)
    on_ray, html, s_ray = audit_data_stream(folder, engine=eng, batch_size=128)
    for d in ("spectral", "knn"):
        assert np.array_equal(s_loc[d], s_ray[d])
    assert local.flagged_rows == on_ray.flagged_rows and local.n_flagged == on_ray.n_flagged
    assert on_ray.n_train == 400 and "engine ray" in html
    # the flipped labels are what kNN finds
    others = np.setdiff1d(np.arange(400), flipped)
    assert s_ray["knn"][flipped].mean() > 4 * s_ray["knn"][others].mean()
    # with a model: its penultimate features, computed on the workers
    model = zoo_digits_cnn(x_tr, y_tr, epochs=1)
    a, _, sa = audit_data_stream(folder, model, batch_size=128)
    b, _, sb = audit_data_stream(folder, model, engine=eng, batch_size=128)
    np.testing.assert_allclose(sa["spectral"], sb["spectral"], rtol=1e-4, atol=1e-6)
    assert np.array_equal(sa["knn"], sb["knn"])
    assert [r["row"] for r in a.flagged_rows] == [r["row"] for r in b.flagged_rows]


def test_shadow_models_on_ray_equal_local(ray_cluster, digits_arrays) -> None:
    from sklearn.linear_model import LogisticRegression

    from bastion.attacks.privacy import OfflineLiRA, ShadowModelAttack
    from bastion.engine import get_engine
    from bastion.models.sklearn_model import SklearnModel

    x_tr, y_tr, x_te, y_te = digits_arrays
    xf, xt = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    target = SklearnModel(LogisticRegression(max_iter=200).fit(xf[:300], y_tr[:300]),
                          n_classes=10, input_shape=(64,))
    args = (target, xf[:100], y_tr[:100], xt[:100], y_te[:100])
    pop = {"x_pop": xf[300:900], "y_pop": y_tr[300:900]}
    eng = get_engine("ray", ray_cluster.address)
    for atk in (ShadowModelAttack(n_shadows=2, seed=4), OfflineLiRA(n_shadows=2, seed=4)):
        loc = atk.run(*args, **pop)
        ray_res = atk.run(*args, **pop, engine=eng)
        assert np.array_equal(loc.scores, ray_res.scores)
        assert loc.auc == ray_res.auc
