"""dpq.evaluate.feature_set: a feature set is checked once (shapes, labels, finite values),
read from .npy files or a features directory, and says what baselines are fitted on."""

import numpy as np
import pytest

from dpq.evaluate.feature_set import FEATURE_FILES, FeatureSet


@pytest.mark.parametrize("part", ["query", "db", "train"])
def test_non_finite_features_are_named_before_any_search(feature_dir, part):
    arrays = {
        name: np.load(feature_dir / f"{name}_features.npy") for name in ("query", "db", "train")
    }
    arrays[part] = arrays[part].copy()
    arrays[part][3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in 1 row.*first: row 3"):
        FeatureSet(
            query_features=arrays["query"],
            query_labels=np.load(feature_dir / "query_labels.npy"),
            db_features=arrays["db"],
            db_labels=np.load(feature_dir / "db_labels.npy"),
            train_features=arrays["train"],
            train_labels=np.load(feature_dir / "train_labels.npy"),
        )


def test_a_directory_is_read_and_the_fitting_data_named(feature_dir, tmp_path):
    features = FeatureSet.from_directory(feature_dir)
    assert features.dim == 16 and features.query_features.shape == (30, 16)
    assert features.fitting_data()[2] == "train"
    no_train = FeatureSet(
        query_features=features.query_features,
        query_labels=features.query_labels,
        db_labels=features.db_labels,
        db_features=features.db_features,
    )
    assert no_train.fitting_data()[2] == "database"
    codes_only = FeatureSet(features.query_features, features.query_labels, features.db_labels)
    with pytest.raises(ValueError, match="baselines need features to fit"):
        codes_only.fitting_data()
    with pytest.raises(FileNotFoundError, match="lacks db_labels.npy"):
        np.save(tmp_path / FEATURE_FILES["query_features"], features.query_features)
        np.save(tmp_path / FEATURE_FILES["query_labels"], features.query_labels)
        FeatureSet.from_directory(tmp_path)
    with pytest.raises(ValueError, match="metric must be one of"):
        FeatureSet(features.query_features, features.query_labels, features.db_labels, metric="x")
    with pytest.raises(ValueError, match="have 30 rows but query labels have 29"):
        FeatureSet(features.query_features, features.query_labels[:29], features.db_labels)
