"""tools/evaluate_predictions.py re-scores the evaluators' dumps to the same numbers."""
import importlib.util
import json
import math

import pytest
import test_coco as coco_cases
import test_flickr as flickr_cases
import test_lvis as lvis_cases
import test_refexp as refexp_cases
from conftest import REPO
from test_flickr import flickr_root  # noqa: F401  (fixture)

from fiber_det.evaluation import FlickrRecallEvaluator, LVISFixedAPEvaluator, PromptedCOCOEvaluator, RefExpEvaluator
from fiber_det.evaluation.coco import COCO_RESULTS_FILE
from fiber_det.evaluation.flickr import FLICKR_PREDICTIONS_FILE
from fiber_det.evaluation.lvis import LVIS_RESULTS_FILE
from fiber_det.evaluation.refexp import REFEXP_PREDICTIONS_FILE


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("evaluate_predictions", REPO / "tools" / "evaluate_predictions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same(a, b):
    assert list(a) == list(b)
    for task in a:
        assert list(a[task]) == list(b[task]), task
        for key, value in a[task].items():
            assert (math.isnan(value) and math.isnan(b[task][key])) or value == b[task][key], (task, key)


def test_coco(tool, tmp_path):
    name = coco_cases.register_json(tmp_path, coco_cases.COCO_GT, "coco", thing_classes=["cat", "dog"],
                                   thing_dataset_id_to_contiguous_id={1: 0, 3: 1})
    preds = coco_cases.perfect_predictions()
    preds[2] = coco_cases.make_instances([[0, 0, 30, 39]], [0.7], [1])  # IoU 0.78: AP below 100
    out = tmp_path / "out"
    expected = coco_cases.run(PromptedCOCOEvaluator(name, output_dir=str(out), distributed=False), preds)
    assert expected["bbox"]["AP"] < 100
    metrics = tmp_path / "metrics.json"
    results = tool.main(["--task", "coco", "--gt", str(tmp_path / "coco_gt.json"),
                         "--predictions", str(out / COCO_RESULTS_FILE), "--output", str(metrics)])
    assert_same(results, expected)
    assert json.loads(metrics.read_text())["bbox"]["AP"] == pytest.approx(expected["bbox"]["AP"])


def test_lvis(tool, tmp_path):
    name = lvis_cases.register_json(tmp_path, lvis_cases.LVIS_GT, "lvis", thing_classes=["apple", "bowl", "cup"],
                                   thing_dataset_id_to_contiguous_id={1: 0, 2: 1, 5: 2})
    preds = lvis_cases.predictions()
    preds[1] = coco_cases.make_instances([[50, 50, 60, 60], [40, 40, 70, 80]], [0.9, 0.85], [1, 2])
    out = tmp_path / "out"
    evaluator = LVISFixedAPEvaluator(name, topk=1, output_dir=str(out), distributed=False)
    expected = {"bbox": lvis_cases.run(evaluator, preds)}
    assert expected["bbox"]["AP"] < 100
    results = tool.main(["--task", "lvis", "--gt", str(tmp_path / "lvis_gt.json"),
                         "--predictions", str(out / LVIS_RESULTS_FILE)])
    assert_same(results, expected)
    assert {"APr", "APc", "APf", "AR@-1", "ARs@-1", "ARm@-1", "ARl@-1"} <= set(results["bbox"])


@pytest.mark.parametrize("with_root", [True, False])
def test_flickr(tool, tmp_path, flickr_root, with_root):
    root = str(flickr_root) if with_root else None
    out = tmp_path / "out"
    expected = {"grounding": flickr_cases.run(
        FlickrRecallEvaluator("flickr_test", gt_type="merged", annotations_root=root, output_dir=str(out),
                              distributed=False))}
    gt = tmp_path / "flickr.json"
    gt.write_text(json.dumps(flickr_cases.FLICKR_JSON))
    argv = ["--task", "flickr", "--gt", str(gt), "--predictions", str(out / FLICKR_PREDICTIONS_FILE)]
    results = tool.main(argv + (["--annotations-root", root] if root else []))
    assert_same(results, expected)
    assert results["grounding"]["R@10"] == 25  # the MERGED headline stored in the dump


def test_refexp(tool, tmp_path):
    out = tmp_path / "out"
    expected = {"refexp": refexp_cases.run(RefExpEvaluator("refcoco_val", output_dir=str(out), distributed=False))}
    gt = tmp_path / "refcoco.json"
    gt.write_text(json.dumps(refexp_cases.REFEXP_JSON))
    results = tool.main(["--task", "refexp", "--gt", str(gt), "--predictions", str(out / REFEXP_PREDICTIONS_FILE)])
    assert_same(results, expected)


def test_unknown_ids_and_wrong_files(tool, tmp_path):
    gt = tmp_path / "refcoco.json"
    gt.write_text(json.dumps(refexp_cases.REFEXP_JSON))
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"task": "refexp", "predictions": [
        {"image_id": 999, "dataset_name": "refcoco", "boxes": [], "scores": []}]}))
    with pytest.raises(ValueError, match="not in"):
        tool.main(["--task", "refexp", "--gt", str(gt), "--predictions", str(dump)])
    with pytest.raises(ValueError, match="flickr evaluator dump"):
        tool.main(["--task", "flickr", "--gt", str(gt), "--predictions", str(dump)])


def test_help_documents_the_formats(tool, capsys):
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    text = capsys.readouterr().out
    for name in (COCO_RESULTS_FILE, LVIS_RESULTS_FILE, FLICKR_PREDICTIONS_FILE, REFEXP_PREDICTIONS_FILE):
        assert name in text


def test_only_the_dumped_entries_are_scored(tool, tmp_path):
    gt = tmp_path / "refcoco.json"
    gt.write_text(json.dumps(refexp_cases.REFEXP_JSON))
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"task": "refexp", "predictions": [
        {"image_id": 6, "dataset_name": "refcoco+", "boxes": [[5, 5, 35, 45]], "scores": [0.8]}]}))
    results = tool.main(["--task", "refexp", "--gt", str(gt), "--predictions", str(dump)])
    assert set(results["refexp"]) == {f"refcoco+_{c}@{k}" for c in ("P", "IoU_P") for k in (1, 5, 10)}
    assert set(results["refexp"].values()) == {100.0}


def test_retrieval(tool, tmp_path):
    import test_retrieval as retrieval_cases
    from fiber_det.evaluation.retrieval import RETRIEVAL_SCORES_FILE, RetrievalEvaluator

    inputs, outputs = retrieval_cases._items(n_img=12, n_txt=30)
    itc, _ = retrieval_cases._expected(inputs, outputs)
    evaluator = RetrievalEvaluator("test_set", output_dir=str(tmp_path), distributed=False, itm_mode="topk",
                                   itm_topk=10, itm_scorer=retrieval_cases._scorer(itc, []))
    expected = retrieval_cases._run(evaluator, inputs, outputs)
    assert "itm_top10_t2i_R@5" in expected["retrieval"]
    results = tool.main(["--task", "retrieval", "--predictions", str(tmp_path / RETRIEVAL_SCORES_FILE)])
    assert_same(results, expected)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a retrieval dump"):
        tool.main(["--task", "retrieval", "--predictions", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        tool.parse_args(["--task", "coco", "--predictions", "p.json"])  # --gt is required there


@pytest.mark.parametrize("case, message", [
    ("unknown_image", "results.json: 1 result(s) name a image_id that {gt} lacks in 'images', e.g. [42]"),
    ("unknown_category", "results.json: 2 result(s) name a category_id that {gt} lacks in 'categories', e.g. [7]"),
    ("no_images_key", "{gt}: no 'images' list"),
    ("malformed", "results.json: not valid json"),
    ("missing_field", "results.json: result 0 lacks ['score']"),
])
def test_bad_inputs_get_one_line_naming_the_file_and_the_id(tool, tmp_path, capsys, case, message):
    gt = dict(coco_cases.COCO_GT)
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]
    if case == "unknown_image":
        results.append({**results[0], "image_id": 42})
    elif case == "unknown_category":
        results += [{**results[0], "category_id": 7}] * 2
    elif case == "no_images_key":
        del gt["images"]
    elif case == "missing_field":
        del results[0]["score"]
    (tmp_path / "coco_gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text("[{" if case == "malformed" else json.dumps(results))
    argv = ["--task", "coco", "--gt", str(tmp_path / "coco_gt.json"), "--predictions", str(tmp_path / "results.json")]
    assert tool.cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate_predictions: error: "), err
    assert message.format(gt=tmp_path / "coco_gt.json") in err[0], err[0]
