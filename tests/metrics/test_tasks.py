"""Task scores against scikit-learn: logistic-regression probe + macro-F1, k-means + mutual information."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_mutual_info_score, f1_score, mutual_info_score, normalized_mutual_info_score
from sklearn.preprocessing import StandardScaler

import sonde.functional as F


def sklearn_probe_f1(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=20000).fit(scaler.transform(x[train]), y[train])
    return float(f1_score(y[test], clf.predict(scaler.transform(x[test])), average="macro"))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return x[:600], y[:600]


def test_split_is_stratified_disjoint_and_reproducible() -> None:
    y = np.repeat([3, 5, 9], [40, 20, 9])
    train, test = F.stratified_split(y, 0.25, seed=7)
    assert set(train).isdisjoint(test) and sorted(np.r_[train, test]) == list(range(len(y)))
    assert [int(np.sum(y[test] == c)) for c in (3, 5, 9)] == [10, 5, 2]
    again = F.stratified_split(y, 0.25, seed=7)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(F.stratified_split(y, 0.25, seed=8)[1], test)


def test_probe_f1_matches_sklearn_on_digits(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    train, test = F.stratified_split(y, 0.25, seed=0)
    assert F.probe_f1(x, y, seed=0) == pytest.approx(sklearn_probe_f1(x, y, train, test), abs=1e-12)


def test_probe_f1_binary_and_torch_input_match_sklearn(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    noisy = x + np.random.default_rng(0).normal(0, 4.0, x.shape)
    binary = (y >= 5).astype(int)
    train, test = F.stratified_split(binary, 0.25, seed=3)
    expected = sklearn_probe_f1(noisy, binary, train, test)
    assert F.probe_f1(torch.from_numpy(noisy).float(), torch.from_numpy(binary), seed=3) == pytest.approx(
        expected, abs=1e-12
    )
    assert 0.5 < expected < 1.0  # a real task, neither trivial nor hopeless


def test_macro_f1_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 4, 200), rng.integers(0, 5, 200)
    assert F.macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro"), abs=1e-12)


def test_probe_f1_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        F.probe_f1(np.zeros((10, 2)), np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match="one label per sample"):
        F.probe_f1(np.zeros((10, 2)), np.zeros(9, dtype=int))


def test_cluster_mi_matches_kmeans_and_mutual_info_on_separable_clusters() -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 10, size=(4, 6))
    y = rng.integers(0, 4, 400)
    x = centres[y] + rng.normal(size=(400, 6))
    y_noisy = y.copy()
    y_noisy[:60] = rng.integers(0, 4, 60)  # labels that clusters cannot fully explain
    got = F.cluster_mi(x, y_noisy, seed=0)
    clusters = KMeans(n_clusters=4, n_init=10, random_state=0).fit_predict(x)
    assert got.mi == pytest.approx(mutual_info_score(y_noisy, clusters), rel=1e-10)
    assert got.ami == pytest.approx(adjusted_mutual_info_score(y_noisy, clusters), rel=1e-8)
    assert got.nmi == pytest.approx(normalized_mutual_info_score(y_noisy, clusters), rel=1e-10)
    assert 0.5 < got.nmi < 1.0


def test_mutual_info_scores_match_sklearn_on_arbitrary_labelings() -> None:
    rng = np.random.default_rng(3)
    for size, ka, kb in ((50, 2, 3), (300, 5, 7), (1000, 10, 10)):
        a, b = rng.integers(0, ka, size), rng.integers(0, kb, size)
        b[: size // 3] = a[: size // 3]
        got = F.mutual_info_scores(a, b)
        assert got.mi == pytest.approx(mutual_info_score(a, b), rel=1e-10)
        assert got.ami == pytest.approx(adjusted_mutual_info_score(a, b), rel=1e-7, abs=1e-12)
        assert got.nmi == pytest.approx(normalized_mutual_info_score(a, b), rel=1e-10)


def test_task_samples_per_sample_and_per_position() -> None:
    acts = torch.randn(3, 4, 5)
    x, y = F.task_samples(acts, torch.tensor([0, 1, 2]))
    assert x.shape == (3, 20) and np.allclose(x, acts.reshape(3, -1).numpy())
    x, y = F.task_samples(acts, torch.tensor([0, 1, 2]), pool="mean")
    assert np.allclose(x, acts.mean(dim=2).numpy())
    labels = torch.tensor([[0, 1, 2, -1], [1, 1, -1, -1], [2, 0, 1, 0]])
    x, y = F.task_samples(acts, labels)
    keep = labels.reshape(-1) >= 0
    assert np.allclose(x, acts.reshape(12, 5)[keep].numpy()) and y.tolist() == labels.reshape(-1)[keep].tolist()
    with pytest.raises(ValueError, match="leading dimensions"):
        F.task_samples(acts, torch.zeros(4, dtype=torch.long))


def test_end_to_end_on_digits_through_the_probe_and_the_store(tmp_path: object) -> None:
    """A small MLP trained on digits; probe_f1 and cluster_mi read back from the SQLite store match
    scikit-learn on activations recomputed here from the weights of the same step."""
    import sonde
    from sonde.metrics import ClusterMI, ProbeF1

    x_all, y_all = load_digits(return_X_y=True)
    x_all = torch.tensor(x_all / 16.0, dtype=torch.float32)
    y_all = torch.tensor(y_all)
    probe_x, probe_y = x_all[:400], y_all[:400]
    train_x, train_y = x_all[400:], y_all[400:]

    def make() -> torch.nn.Sequential:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    states = {}
    store = str(tmp_path) + "/sonde.db"  # type: ignore[operator]
    with sonde.probe(model, run="digits", store=store, optimizer=opt, layers=["1"],
                     metrics=[ProbeF1(compute_every=4), ClusterMI(compute_every=4)],
                     probe_set=(probe_x, probe_y)) as p:
        for step in range(9):
            states[step] = {k: v.clone() for k, v in model.state_dict().items()}
            batch = slice(64 * step, 64 * step + 64)
            loss = torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss)
    df = sonde.load(store, run="digits")
    assert sorted(set(df.metric)) == ["cluster_ami", "cluster_mi", "cluster_nmi", "probe_f1"]
    twin = make()
    for step in (0, 4, 8):
        twin.load_state_dict(states[step])
        with torch.no_grad():
            acts = torch.relu(twin[0](probe_x)).double().numpy()
        y = probe_y.numpy()
        got = df[(df.step == step) & (df.layer == "1")].set_index("metric").value
        train, test = F.stratified_split(y, 0.25, seed=0)
        assert got["probe_f1"] == pytest.approx(sklearn_probe_f1(acts, y, train, test), abs=1e-9)
        clusters = F.kmeans(acts, 10, seed=0)  # checked against sklearn's KMeans above; scores from sklearn here
        assert got["cluster_mi"] == pytest.approx(mutual_info_score(y, clusters), rel=1e-9)
        assert got["cluster_ami"] == pytest.approx(adjusted_mutual_info_score(y, clusters), rel=1e-7)
        assert got["cluster_nmi"] == pytest.approx(normalized_mutual_info_score(y, clusters), rel=1e-9)
    first, last = (df[(df.step == s) & (df.metric == "probe_f1")].value.item() for s in (0, 8))
    assert last > first  # the layer learned something about the digits
