"""Evaluation: metric functions on hand-made inputs with known answers, oracle and random embeddings,
the honesty of the few-shot supports on the real splits, and the whole evaluation (and its CLI) run end
to end on real data with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import m3bind
from train import eval_sets, evaluate, metrics, report, suites

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
TINY_RUN = suites.EvalConfig(shots=(1, 4), seeds=(0, 1), max_test=24, max_library=24)  # QUICK, smaller still


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- metrics, known answers

def test_auc_known_values_and_ties():
    assert metrics.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert metrics.auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert metrics.auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert metrics.auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # ties count half
    assert np.isnan(metrics.auc([0.2, 0.3], [1, 1]))  # no negatives: undefined, not a number that looks fine


def test_rowwise_auc_matches_sklearn_on_random_rows():
    scores = RNG.normal(size=(20, 50)).round(1)  # rounding makes ties
    labels = RNG.random((20, 50)) < 0.3
    expected = [roc_auc_score(y, s) for s, y in zip(scores, labels)]
    np.testing.assert_allclose(metrics.rowwise_auc(scores, labels), expected)


def test_per_class_auc_accuracy_and_multilabel_rule():
    targets = np.eye(3, dtype=bool)[[0, 1, 2, 0]]
    perfect = targets.astype(float)
    np.testing.assert_allclose(metrics.per_class_auc(perfect, targets), [1, 1, 1])
    np.testing.assert_allclose(metrics.per_class_auc(-perfect, targets), [0, 0, 0])
    scores = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.0, 0.1, 0.9], [0.3, 0.6, 0.1]])
    assert metrics.top1_accuracy(scores, targets) == 0.5
    # multi-label: a hit when the top class is any of the record's classes; records without a class are left out
    multi = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=bool)
    assert metrics.top1_accuracy(np.array([[0, 0, 1], [1, 0, 0], [1, 0, 0]]), multi) == 0.5
    m = metrics.classification_metrics(perfect, targets)
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["per_class_auc"] == [1.0, 1.0, 1.0]


def test_bootstrap_interval_holds_the_auc_and_narrows_with_more_items():
    def scored(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 3, n)
        scores = np.eye(3)[labels] + rng.normal(scale=0.8, size=(n, 3))
        return scores, np.eye(3, dtype=bool)[labels]

    small, large = scored(150, 1), scored(3000, 2)
    lo, hi = metrics.bootstrap_interval(*small)
    assert lo < metrics.classification_metrics(*small)["auc"] < hi
    lo_large, hi_large = metrics.bootstrap_interval(*large)
    assert hi_large - lo_large < (hi - lo) / 2  # about 1/sqrt(20) as wide
    targets = np.eye(3, dtype=bool)[[0, 1, 2, 0, 1, 2]]
    assert metrics.bootstrap_interval(targets.astype(float), targets) == [1.0, 1.0]  # perfect on every draw
    assert metrics.bootstrap_interval(np.zeros((4, 2)), np.ones((4, 2), bool)) is None  # AUC never defined


def test_recall_and_precision_at_k():
    sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    relevant = np.array([[0, 0, 1, 0, 0, 1],
                         [0, 0, 0, 0, 0, 1]], dtype=bool)
    hits = metrics.recall_at_k(sim, relevant, (1, 2, 3))
    np.testing.assert_array_equal(hits[1], [0, 1])
    np.testing.assert_array_equal(hits[3], [1, 1])
    np.testing.assert_allclose(metrics.precision_at_k(sim, relevant, 3), [1 / 3, 1 / 3])
    np.testing.assert_allclose(metrics.precision_at_k(sim, relevant, 10), [2 / 6, 1 / 6])  # k beyond the library
    out = metrics.retrieval_metrics(np.eye(3), np.eye(3), np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1]], bool), (1,))
    assert out["n_queries"] == 1 and out["R@1"] == 1.0  # nothing relevant, or everything: not informative


def test_cross_modal_metrics_are_status_balanced():
    """A ranking that ignores the query (normal items always first) sits at chance whatever the mix."""
    e = np.eye(2)
    items, item_abnormal = e[[0, 0, 1, 1, 1]], np.array([0, 0, 1, 1, 1])
    queries, query_abnormal = e[[0, 0, 0, 0]], np.array([0, 0, 0, 1])
    m = metrics.cross_modal_metrics(queries, query_abnormal, items, item_abnormal, k=2)
    assert m["auc"] == 0.5 and m["auc_query_mean"] == 0.75
    assert m["p@2"] == 0.5 and m["p@2_query_mean"] == 0.75
    assert m["chance_p@2"] == pytest.approx(0.5) and m["chance_p@2_query_mean"] == pytest.approx(0.45)
    good = metrics.cross_modal_metrics(e[query_abnormal], query_abnormal, items, item_abnormal, k=2)
    assert good["auc"] == 1.0 and good["p@2"] == 1.0


def test_balanced_subset_and_nested_support():
    labels = np.array([0] * 90 + [1] * 10)
    keep = eval_sets.balanced_subset(labels, 20, seed=0)
    assert len(keep) == 20 and (labels[keep] == 1).sum() == 10 and np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(keep, eval_sets.balanced_subset(labels, 20, seed=0))
    assert len(eval_sets.balanced_subset(labels, None, 0)) == 100
    targets = np.eye(2, dtype=bool)[labels]
    deep, shallow = eval_sets.draw_support(targets, 16, seed=3), eval_sets.draw_support(targets, 4, seed=3)
    assert {c: len(i) for c, i in deep.items()} == {0: 16, 1: 10}  # a class with fewer items gives what it has
    for c in deep:
        np.testing.assert_array_equal(deep[c][:4], shallow[c])  # k=4 is inside k=16 for one seed
        assert targets[deep[c], c].all()
    assert not np.array_equal(eval_sets.draw_support(targets, 16, seed=4)[0], deep[0])


# --------------------------------------------------------------------------- oracle and random embeddings

def oracle_data(n_per_class=50, classes=3, dim=16, noise=0.05):
    directions = unit(RNG.normal(size=(classes, dim)))
    labels = np.repeat(np.arange(classes), n_per_class)
    emb = unit(directions[labels] + noise * RNG.normal(size=(len(labels), dim)))
    return directions, labels, emb


def test_oracle_embeddings_score_perfectly_and_random_ones_at_chance():
    directions, labels, emb = oracle_data()
    targets = np.eye(3, dtype=bool)[labels]
    for multi_label in (False, True):
        scores = metrics.zero_shot_scores(emb, directions, multi_label, logit_scale=50.0)
        m = metrics.classification_metrics(scores, targets)
        assert m["auc"] == 1.0 and m["accuracy"] == 1.0
    relevant = targets.T  # query c (the class direction) is relevant to the items of class c
    r = metrics.retrieval_metrics(directions, emb, relevant, (1, 5, 10))
    assert r["R@1"] == r["R@10"] == 1.0
    # cross-modal: two "modalities" whose normal and abnormal items share two directions of one space
    status_directions, status_a, emb_a = oracle_data(classes=2)
    status_b = RNG.permutation(status_a)
    emb_b = unit(status_directions[status_b] + 0.05 * RNG.normal(size=emb_a.shape))
    cm = metrics.cross_modal_metrics(emb_a, status_a, emb_b, status_b, k=10)
    assert cm["auc"] == 1.0 and cm["p@10"] == 1.0

    noise = unit(RNG.normal(size=(2000, 16)))
    random_labels = RNG.integers(0, 3, 2000)
    m = metrics.classification_metrics(metrics.zero_shot_scores(noise, directions, False, 50.0),
                                  np.eye(3, dtype=bool)[random_labels])
    assert abs(m["auc"] - 0.5) < 0.05 and abs(m["accuracy"] - 1 / 3) < 0.05
    cm = metrics.cross_modal_metrics(noise[:300], random_labels[:300] == 0, noise[300:900], random_labels[300:900] > 0)
    assert abs(cm["auc"] - 0.5) < 0.05 and abs(cm["p@10"] - cm["chance_p@10"]) < 0.05


def test_cross_modal_bootstrap_interval_is_tight_for_oracles_and_holds_the_mean():
    status_directions, status_a, emb_a = oracle_data(classes=2)
    status_b = RNG.permutation(status_a)
    emb_b = unit(status_directions[status_b] + 0.05 * RNG.normal(size=emb_a.shape))
    oracle = {"a": (emb_a, emb_a, status_a), "b": (emb_b, emb_b, status_b)}
    assert metrics.bootstrap_pair_mean(oracle, ["a->b", "b->a"], k=10, rounds=20) == [1.0, 1.0]
    noisy = {m: (e, e, s) for m, (e, s) in
             {"a": (unit(emb_a + RNG.normal(size=emb_a.shape)), status_a),
              "b": (unit(emb_b + RNG.normal(size=emb_b.shape)), status_b)}.items()}
    mean = np.mean([metrics.cross_modal_metrics(noisy[a][1], noisy[a][2], noisy[b][0], noisy[b][2])["auc"]
                    for a, b in (("a", "b"), ("b", "a"))])
    lo, hi = metrics.bootstrap_pair_mean(noisy, ["a->b", "b->a"], k=10, rounds=50)
    assert 0.5 < lo < mean < hi < 1
    assert metrics.bootstrap_pair_mean(noisy, [], k=10) is None


# --------------------------------------------------------------------------- the report

def test_model_card_tables_are_the_report_of_its_evaluation_json():
    """The default model's card holds exactly what ``markdown_table`` makes of its ``evaluation.json`` (bound
    model, counterparts, unbound cross-modal baseline, search and detection): the table's format is fixed."""
    card = REPO / "assets" / "m3bind-default"
    results = json.loads((card / "evaluation.json").read_text())
    table = report.markdown_table(results)
    assert table.strip() in (card / "README.md").read_text()
    z = results["bound"]["zero_shot"]["ptbxl/ecg"]
    assert f"| ptbxl | ecg | {z['n']} | {z['auc']:.3f} ({z['auc_ci95'][0]:.2f}–{z['auc_ci95'][1]:.2f}) |" in table
    bound_only = report.markdown_table(results["bound"])  # an ``evaluate`` result: no counterpart columns
    assert "AUC counterpart" not in bound_only and "| AUC bound | ACC bound |" in bound_only


# --------------------------------------------------------------------------- honesty on the real splits

@pytest.mark.parametrize("name,modality", [("pneumoniamnist", "xray"), ("covid_cxr", "xray"),
                                           ("ptbxl", "ecg"), ("retinamnist", "retina")])
def test_few_shot_support_comes_from_train_and_never_from_test(shared_data, name, modality):
    train = eval_sets.load_eval_set(name, modality, "train", shared_data)
    test = eval_sets.load_eval_set(name, modality, "test", shared_data)
    assert train.pairs and test.pairs and {p.split for p in train.pairs} == {"train"}
    test_ids = {p.item_id for p in test.pairs}
    for seed in range(5):
        support = eval_sets.draw_support(train.targets, 16, seed)
        chosen = [train.pairs[i] for idx in support.values() for i in idx]
        assert not {p.item_id for p in chosen} & test_ids
        eval_sets.check_disjoint(chosen, test.pairs)
    with pytest.raises(RuntimeError, match="overlaps"):
        eval_sets.check_disjoint(test.pairs[:3], test.pairs)


def test_abnormal_status_rules_on_real_labels(shared_data):
    ecg = eval_sets.load_eval_set("ptbxl", "ecg", "test", shared_data)
    status = eval_sets.abnormal_status(ecg, eval_sets.NORMAL_CLASS["ecg"][1])
    for pair, s in zip(ecg.pairs, status):
        assert s == (-1 if not pair.targets else 0 if pair.targets == (0,) else 1)  # NORM alone is normal
    breast = eval_sets.load_eval_set("breastmnist", "ultrasound", "test", shared_data)
    status = eval_sets.abnormal_status(breast, eval_sets.NORMAL_CLASS["ultrasound"][1])
    np.testing.assert_array_equal(status, [1 if p.label == 0 else 0 for p in breast.pairs])  # 0 = malignant


# --------------------------------------------------------------------------- end to end, tiny model, real data

@pytest.fixture(scope="module")
def tiny_teachers(tiny_config):
    """Unbound counterparts: one tower each, their own (differently initialised) text projection."""
    import torch

    teachers = {}
    for i, modality in enumerate(("xray", "ecg")):
        torch.manual_seed(100 + i)
        cfg = m3bind.ModelConfig(name=f"tiny-{modality}", dim=tiny_config.dim,
                                 towers={modality: tiny_config.towers[modality]},
                                 modality_towers={modality: modality})
        teachers[modality] = m3bind.M3BindModel(cfg)
    return teachers


@pytest.mark.slow
def test_compare_end_to_end_on_real_data(tiny_model, tiny_teachers, shared_data):
    results = evaluate.compare(tiny_model, tiny_teachers, data_root=shared_data, config=TINY_RUN)
    json.dumps(results, allow_nan=False)  # plain JSON
    bound = results["bound"]
    assert bound["split"] == "test" and set(bound["model"]["modalities"]) == {"xray", "ct", "retina", "ecg"}
    assert set(bound["zero_shot"]) == {"cxr_nih/xray", "pneumoniamnist/xray", "covid_cxr/xray", "covid_ct/ct",
                                       "covid_cxr/ct", "idrid/retina", "retinamnist/retina", "ptbxl/ecg"}
    assert "skipped" in bound["zero_shot"]["covid_cxr/ct"]  # one class among its test items
    for key in ("pneumoniamnist/xray", "retinamnist/retina", "ptbxl/ecg"):
        z = bound["zero_shot"][key]
        assert z["n"] <= TINY_RUN.max_test and 0 <= z["auc"] <= 1 and 0 <= z["accuracy"] <= 1
        assert z["auc_ci95"][0] <= z["auc"] <= z["auc_ci95"][1]
        f = bound["few_shot"][key]
        for method in suites.FEW_SHOT_METHODS:
            assert set(f[method]) == {"1", "4"}
            for stats in f[method].values():
                assert 0 <= stats["auc_mean"] <= 1 and stats["auc_std"] >= 0 and 0 <= stats["accuracy_mean"] <= 1
    assert len(bound["zero_shot"]["ptbxl/ecg"]["per_class_auc"]) == 5
    assert bound["few_shot"]["pneumoniamnist/xray"]["support_items"] == {"1": 2.0, "4": 8.0}

    r = bound["retrieval"]["all"]
    assert r["n_queries"] > 0 and all(0 <= r[f"R@{k}"] <= 1 for k in (1, 5, 10))
    assert r["R@1"] <= r["R@5"] <= r["R@10"]
    assert set(bound["retrieval"]["per_modality"]) == {"xray", "ct", "retina", "ecg"}

    cm = bound["cross_modal"]
    four = ("xray", "ct", "retina", "ecg")
    assert set(cm["pairs"]) == {f"{a}->{b}" for a in four for b in four if a != b}
    assert cm["mean"]["n_pairs"] == 12 and 0 <= cm["mean"]["auc"] <= 1 and 0 < cm["mean"]["chance_p@10"] < 1
    assert cm["core_mean"]["auc_ci95"][0] <= cm["core_mean"]["auc"] <= cm["core_mean"]["auc_ci95"][1]

    assert set(results["counterparts"]) == {"xray", "ecg"}
    xray = results["counterparts"]["xray"]
    assert set(xray["zero_shot"]) == {"cxr_nih/xray", "pneumoniamnist/xray", "covid_cxr/xray"}
    assert "cross_modal" not in xray and "search" not in xray
    # the counterpart scores exactly the bound model's items
    assert xray["sets"]["pneumoniamnist/xray"] == bound["sets"]["pneumoniamnist/xray"]
    assert set(results["unbound_cross_modal"]["pairs"]) == {"xray->ecg", "ecg->xray"}
    assert cm["mean_on_counterpart_pairs"]["n_pairs"] == 2  # the bound mean over the same two pairs

    referable = bound["zero_shot"]["idrid/retina"]["binary"]
    assert referable["name"].startswith("referable") and 0 <= referable["auc"] <= 1
    queries = bound["search"]["queries"]
    assert queries["n"] > 0 and all(0 <= queries[key] <= 1 for key in ("p@10", "r@10", "modality@10", "landing"))
    assert {q["modality"] for q in queries["per_query"]} == {"xray", "ct", "retina", "ecg"}  # the modalities it encodes
    assert bound["search"]["notes"]["n"] > 0 and 0 <= bound["search"]["notes"]["abnormal_chest@10"] <= 1
    assert "detection" not in bound  # the tiny model has no detector

    table = report.markdown_table(results)
    for heading in ("Zero-shot", "Few-shot", "Text-to-image", "Cross-modal", "Search over one library"):
        assert heading in table
    assert "AUC counterpart" in table and "AUC unbound" in table and "| xray->ecg |" in table
    assert "mean over the pairs with counterparts" in table
    z = bound["zero_shot"]["ptbxl/ecg"]
    assert f"{z['auc']:.3f} ({z['auc_ci95'][0]:.2f}–{z['auc_ci95'][1]:.2f})" in table


def test_evaluation_is_deterministic_and_refuses_the_train_split(tiny_model, shared_data):
    run = lambda: evaluate.evaluate(tiny_model, ["few_shot"], shared_data, config=TINY_RUN,  # noqa: E731
                              modalities=["retina"])
    assert run()["few_shot"] == run()["few_shot"]
    with pytest.raises(ValueError, match="train"):
        evaluate.evaluate(tiny_model, ["zero_shot"], shared_data, split="train")
    with pytest.raises(ValueError, match="suite"):
        evaluate.evaluate(tiny_model, ["nonsense"], shared_data)


def test_cli_writes_json_and_prints_the_table(tiny_model, tiny_teachers, shared_data, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "bound")
    tiny_teachers["ecg"].save_pretrained(tmp_path / "ecg")
    out = tmp_path / "results.json"
    assert evaluate.main(["--model", str(tmp_path / "bound"), "--teachers", str(tmp_path / "ecg"), "--quick",
                    "--data-root", str(shared_data), "--suites", "cross_modal",
                    "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert set(results["counterparts"]) == {"ecg"} and set(results["bound"]["cross_modal"]["pairs"]) == {
        f"{a}->{b}" for a in ("xray", "ct", "retina", "ecg") for b in ("xray", "ct", "retina", "ecg") if a != b}
    assert "zero_shot" not in results["bound"]
    printed = capsys.readouterr().out
    assert "### Cross-modal" in printed and "| **mean** |" in printed and "Zero-shot" not in printed


def test_class_prompt_retrieval_counts_a_class_from_any_dataset_of_its_modality():
    """Two sets of one modality share their prompts: a prompt's nearest item of its class from the other set
    is a hit overall, and a miss in the ``same_dataset`` figure, which counts only the prompt's own set."""
    from train.data import Pair
    from train.eval_sets import Embedder, EvalSet

    names = ["normal", "disease"]
    prompts = {name: [f"a scan showing {name}"] for name in names}
    directions = np.eye(4, dtype=np.float32)
    embed = Embedder(model=None)
    embed.text_cache = {f"a scan showing {name}": directions[c] for c, name in enumerate(names)}

    def eval_set(dataset: str, offset: float) -> EvalSet:
        pairs = []
        for c in (0, 1):
            for i in range(3):
                item_id = f"{dataset}-{c}-{i}"
                v = directions[c] + offset * directions[2 + i % 2]  # the closer set sits nearer the prompts
                embed.cache[item_id] = v / np.linalg.norm(v)
                pairs.append(Pair(item_id, "test", "xray", c, names[c], (), load=None, targets=(c,)))
        return EvalSet(dataset, "xray", "test", False, names, prompts, pairs)

    near, far = eval_set("near", 0.1), eval_set("far", 2.0)
    r = suites.retrieval(embed, [near, far], (1, 3))
    assert r["n_queries"] == 2 and r["R@1"] == r["R@3"] == 1.0
    assert r["same_dataset"]["n_queries"] == 4  # each prompt once per set holding its class
    assert r["per_set"]["near/xray"]["R@1"] == 1.0
    assert r["per_set"]["far/xray"]["R@1"] == r["per_set"]["far/xray"]["R@3"] == 0.0
    assert r["same_dataset"]["R@1"] == 0.5
