"""load_data: every source and every bad input gives a clear DataError."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from bastion.data import load_data, read_idx, write_idx
from bastion.errors import DataError


@pytest.fixture(scope="module")
def mnist_slice(mnist_npz):
    with np.load(mnist_npz, allow_pickle=False) as z:
        return (z["x_train"][:300], z["y_train"][:300], z["x_test"][:100], z["y_test"][:100])


def test_builtin_digits():
    ds = load_data("builtin:digits")
    assert ds.kind == "image" and ds.input_shape == (1, 8, 8) and ds.n_classes == 10
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert len(ds.x_test) == pytest.approx(0.25 * 1797, abs=1)
    # stratified: every class in the test split
    assert set(np.unique(ds.y_test)) == set(range(10))
    again = load_data("builtin:digits")
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    other = load_data("builtin:digits", seed=1)
    assert not np.array_equal(ds.y_train, other.y_train)


@pytest.mark.parametrize("name,n_features,n_classes", [("breast-cancer", 30, 2), ("wine", 13, 3)])
def test_builtin_tables_scaled_on_train(name, n_features, n_classes):
    ds = load_data(f"builtin:{name}")
    assert ds.kind == "tabular" and ds.input_shape == (n_features,)
    assert ds.n_classes == n_classes and ds.bounds == (0.0, 1.0)
    assert len(ds.feature_names) == n_features and len(ds.class_names) == n_classes
    # scaler fitted on train: train spans exactly [0, 1] per feature
    np.testing.assert_allclose(ds.x_train.min(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(ds.x_train.max(axis=0), 1.0, atol=1e-6)
    assert ds.x_test.min() >= 0.0 and ds.x_test.max() <= 1.0
    assert len(ds.meta["scaler_min"]) == n_features


def test_mnist_npz(tmp_path, mnist_slice):
    x_tr, y_tr, x_te, y_te = mnist_slice
    p = tmp_path / "small.npz"
    np.savez(p, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    ds = load_data(f"mnist:{p}")
    assert ds.input_shape == (1, 28, 28) and len(ds.x_train) == 300 and len(ds.x_test) == 100
    np.testing.assert_allclose(ds.x_train[5, 0], x_tr[5] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(ds.y_test, y_te)
    fds = load_data(f"fashion-mnist:{p}")
    assert fds.name == "fashion-mnist" and fds.class_names[0] == "T-shirt/top"


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_folder(tmp_path, mnist_slice, gz):
    x_tr, y_tr, x_te, y_te = mnist_slice
    ext = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", x_tr)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", y_tr)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", x_te)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", y_te)
    ds = load_data(f"mnist:{tmp_path}")
    assert ds.x_train.shape == (300, 1, 28, 28)
    np.testing.assert_allclose(ds.x_test[:, 0], x_te / 255.0, atol=1e-6)
    np.testing.assert_array_equal(ds.y_train, y_tr)


def test_idx_bad_magic_and_truncation(tmp_path, mnist_slice):
    x_tr = mnist_slice[0][:10]
    p = tmp_path / "a-idx3-ubyte"
    write_idx(p, x_tr)
    assert read_idx(p).shape == (10, 28, 28)
    raw = p.read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-7])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04" + raw[4:])
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    with pytest.raises(DataError, match="magic number"):
        read_idx(p, expect_magic=0x801)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(raw)[:40])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(tmp_path / "bad.gz")


def test_idx_folder_swapped_files(tmp_path, mnist_slice):
    x_tr, y_tr, x_te, y_te = mnist_slice
    write_idx(tmp_path / "train-images-idx3-ubyte", y_tr)  # labels in the image file
    write_idx(tmp_path / "train-labels-idx1-ubyte", y_tr)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x_te)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y_te)
    with pytest.raises(DataError, match="magic number"):
        load_data(f"mnist:{tmp_path}")


def test_idx_folder_missing_file(tmp_path, mnist_slice):
    write_idx(tmp_path / "train-images-idx3-ubyte", mnist_slice[0])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_data(f"mnist:{tmp_path}")


def _table(n=80, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(5, 2, n), "b": rng.uniform(-3, 3, n)})
    df["label"] = (df["a"] > 5).astype(int)
    return df


def test_csv_numeric_labels_and_bounds(tmp_path):
    df = _table()
    p = tmp_path / "t.csv"
    df.to_csv(p, index=False)
    ds = load_data(f"csv:{p}", test_size=0.25, seed=3)
    assert ds.kind == "tabular" and ds.input_shape == (2,) and ds.n_classes == 2
    assert ds.feature_names == ["a", "b"]
    assert len(ds.x_train) == 60 and len(ds.x_test) == 20
    assert ds.bounds == (float(ds.x_train.min()), float(ds.x_train.max()))
    assert ds.x_test.min() >= ds.bounds[0] and ds.x_test.max() <= ds.bounds[1]
    # stratified split keeps the class ratio
    assert abs(ds.y_test.mean() - df["label"].mean()) < 0.1


def test_csv_unit_range_gets_unit_bounds(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"f1": rng.uniform(0, 1, 40), "f2": rng.uniform(0, 1, 40),
                       "label": np.arange(40) % 2})
    df.to_csv(tmp_path / "u.csv", index=False)
    assert load_data(f"csv:{tmp_path / 'u.csv'}").bounds == (0.0, 1.0)


def test_parquet_string_labels_custom_column(tmp_path):
    df = _table()
    df["species"] = np.where(df.pop("label") == 1, "setosa", "versicolor")
    p = tmp_path / "t.parquet"
    df.to_parquet(p)
    ds = load_data(f"parquet:{p}", label_column="species")
    assert ds.class_names == ["setosa", "versicolor"]
    assert ds.feature_names == ["a", "b"]
    all_y = np.concatenate([ds.y_train, ds.y_test])
    assert sorted(np.bincount(all_y).tolist()) == sorted(
        df["species"].value_counts().tolist())


def test_csv_noncontiguous_int_labels(tmp_path):
    df = _table()
    df["label"] = df["label"] * 5 + 3  # 3 and 8
    df.to_csv(tmp_path / "t.csv", index=False)
    ds = load_data(f"csv:{tmp_path / 't.csv'}")
    assert ds.class_names == ["3", "8"] and set(np.unique(ds.y_train)) == {0, 1}


# ------------------------------------------------------------------ bad inputs


def test_unknown_scheme_lists_valid():
    with pytest.raises(DataError, match="unknown data scheme") as e:
        load_data("s3:bucket/x")
    assert "builtin" in str(e.value) and "parquet" in str(e.value)
    with pytest.raises(DataError, match="no scheme"):
        load_data("digits")
    with pytest.raises(DataError, match="unknown built-in dataset"):
        load_data("builtin:cifar")


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(f"csv:{tmp_path / 'nope.csv'}")
    with pytest.raises(DataError, match="not found"):
        load_data(f"mnist:{tmp_path / 'nope.npz'}")


def test_corrupt_npz(tmp_path, mnist_slice):
    x_tr, y_tr, x_te, y_te = mnist_slice
    p = tmp_path / "m.npz"
    np.savez(p, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    raw = p.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt|truncated"):
        load_data(f"mnist:{tmp_path / 'trunc.npz'}")
    np.savez(tmp_path / "keys.npz", x_train=x_tr, y_train=y_tr)
    with pytest.raises(DataError, match="lacks the keys"):
        load_data(f"mnist:{tmp_path / 'keys.npz'}")


def test_empty_and_misshapen_npz(tmp_path):
    e = np.zeros((0, 28, 28), np.uint8)
    np.savez(tmp_path / "e.npz", x_train=e, y_train=np.zeros(0, np.uint8), x_test=e,
             y_test=np.zeros(0, np.uint8))
    with pytest.raises(DataError, match="empty"):
        load_data(f"mnist:{tmp_path / 'e.npz'}")
    w = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "w.npz", x_train=w, y_train=np.zeros(4, np.uint8), x_test=w,
             y_test=np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=r"expected \(n, 28, 28\)"):
        load_data(f"mnist:{tmp_path / 'w.npz'}")


def test_npz_with_pickled_objects_refused(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[:] = [{"a": 1}, {"b": 2}]
    np.savez(tmp_path / "o.npz", x_train=obj, y_train=obj, x_test=obj, y_test=obj)
    with pytest.raises(DataError, match="pickled"):
        load_data(f"mnist:{tmp_path / 'o.npz'}")


def test_missing_label_column_lists_columns(tmp_path):
    _table().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="label column 'target'") as e:
        load_data(f"csv:{tmp_path / 't.csv'}", label_column="target")
    assert "'a'" in str(e.value) and "'label'" in str(e.value)


def test_non_numeric_columns_named(tmp_path):
    df = _table()
    df["city"] = "Paris"
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"non-numeric.*city"):
        load_data(f"csv:{tmp_path / 't.csv'}")


def test_empty_tables(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_data(f"csv:{tmp_path / 'e.csv'}")
    (tmp_path / "h.csv").write_text("a,b,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_data(f"csv:{tmp_path / 'h.csv'}")


def test_nan_and_inf_rejected(tmp_path):
    df = _table()
    df.loc[3, "a"] = np.nan
    df.to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(DataError, match="1 NaN or infinite"):
        load_data(f"csv:{tmp_path / 'n.csv'}")
    df = _table()
    df.loc[3, "b"] = np.inf
    df.to_parquet(tmp_path / "i.parquet")
    with pytest.raises(DataError, match="NaN or infinite"):
        load_data(f"parquet:{tmp_path / 'i.parquet'}")


def test_corrupt_parquet(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="cannot read parquet"):
        load_data(f"parquet:{tmp_path / 'c.parquet'}")


def test_bad_test_size():
    with pytest.raises(DataError, match="test_size"):
        load_data("builtin:wine", test_size=1.5)


def test_npz_scheme_any_shape_and_both_layouts(tmp_path):
    rng = np.random.default_rng(0)
    # four arrays, tabular, values outside [0, 1]
    x = rng.normal(size=(60, 5)).astype(np.float64)
    y = np.arange(60) % 3
    p = tmp_path / "tab.npz"
    np.savez(p, x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    ds = load_data(f"npz:{p}")
    assert ds.kind == "tabular" and ds.input_shape == (5,) and ds.n_classes == 3
    assert ds.bounds[0] == pytest.approx(x.min()) and ds.bounds[1] == pytest.approx(x.max())
    np.testing.assert_allclose(ds.x_test, x[40:].astype(np.float32))
    # x, y only: split here, stratified; (n, H, W) uint8 images become (n, 1, H, W) in [0, 1]
    imgs = rng.integers(0, 256, size=(80, 6, 7), dtype=np.uint8)
    q = tmp_path / "xy.npz"
    np.savez(q, x=imgs, y=np.arange(80) % 4)
    ds2 = load_data(f"npz:{q}", test_size=0.25)
    assert ds2.kind == "image" and ds2.input_shape == (1, 6, 7)
    assert len(ds2.x_train) == 60 and len(ds2.x_test) == 20 and ds2.bounds == (0.0, 1.0)
    assert ds2.x_train.max() <= 1.0


def test_npz_scheme_reads_what_bastion_writes(tmp_path):
    from bastion.audit import poison_dataset
    from bastion.defend.sanitize import sanitize, write_sanitized

    ds = load_data("builtin:digits")
    _, _, paths = poison_dataset(ds, attack="badnets", rate=0.05, target=7, out_dir=tmp_path)
    back = load_data(f"npz:{paths['data']}")
    assert back.input_shape == ds.input_shape and back.n_classes == 10
    assert back.bounds == ds.bounds and len(back.y_train) == len(ds.y_train)
    assert back.meta["poison_mask"].sum() == int(0.05 * len(ds.y_train))
    scores = back.meta["poison_mask"].astype(float)
    res = sanitize(back, scores, threshold=0.5)
    written = write_sanitized(res, tmp_path / "clean")
    cleaned = load_data(f"npz:{written['data']}")
    assert len(cleaned.y_train) == len(ds.y_train) - int(back.meta["poison_mask"].sum())
    assert "poison_mask" not in cleaned.meta


@pytest.mark.parametrize("arrays,needle", [
    ({"a": np.zeros(3)}, "lacks the arrays"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 0])}, "3 labels for 4 inputs"),
    ({"x": np.zeros((4, 2)), "y": np.array([0.5, 1, 0, 1])}, "class indices"),
    ({"x": np.zeros(4), "y": np.array([0, 1, 0, 1])}, "expected numbers"),
    ({"x": np.array([[np.nan, 1]] * 4), "y": np.array([0, 1, 0, 1])}, "NaN"),
    ({"x_train": np.zeros((4, 2)), "y_train": np.array([0, 1, 0, 1]),
      "x_test": np.zeros((2, 3)), "y_test": np.array([0, 1])}, "splits do not match"),
])
def test_npz_scheme_bad_files_one_clear_error(tmp_path, arrays, needle):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=needle):
        load_data(f"npz:{p}")


def test_npz_scheme_refuses_pickles_and_garbage(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([{"a": 1}] * 4, dtype=object), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match="pickled"):
        load_data(f"npz:{p}")
    g = tmp_path / "garbage.npz"
    g.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="cannot read"):
        load_data(f"npz:{g}")
    with pytest.raises(DataError, match="not found"):
        load_data(f"npz:{tmp_path / 'missing.npz'}")
