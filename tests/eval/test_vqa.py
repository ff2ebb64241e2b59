"""``score-vqa`` is the official VQA evaluation: every normalization rule against a hand-checked table,
hand-computed accuracies, and OpenFlamingo's ``compute_vqa_accuracy`` on the same files."""

import importlib.util
import json
import os

import pytest

from vlmcore.eval.cli import main
from vlmcore.eval.vqa import normalize_answer, question_accuracy, stem_tagged_words, vqa_accuracy

# (raw prediction, what the official evaluation compares), each checked by hand against vqaEval.py.
NORMALIZATION_TABLE = [
    ("Two dogs.", "2 dogs"),  # final period dropped, number word -> digit, lower case
    ("yes!", "yes"),  # "!" not touching a space -> a space, then whitespace collapses
    ("dog, cat", "dog cat"),  # ", " touches a space -> deleted
    ("black - white", "black white"),  # "- " touches a space -> deleted
    ("t-shirt", "t shirt"),  # "-" inside a word -> a space
    ("(left)", "left"),  # brackets -> spaces
    ("a/b", "b"),  # "/" -> a space, then "a" is an article
    ("1,000", "1000"),  # digit,digit: every punctuation mark is deleted, not spaced
    ("3.5", "3.5"),  # a period before a digit stays
    ("U.S.A.", "usa"),  # other periods go
    ("12:30", "12:30"),  # ":" is not in the official list
    ("what's", "what's"),  # nor is the apostrophe
    ("a dog", "dog"),  # articles: a, an, the
    ("An apple", "apple"),
    ("the Red Car", "red car"),
    ("none", "0"),  # the manual map: none / zero -> 0, one..ten -> digits
    ("zero", "0"),
    ("one two three", "1 2 3"),
    ("ten", "10"),
    ("eleven", "eleven"),  # not in the map
    ("dont", "don't"),  # contractions written without the apostrophe
    ("Isnt it", "isn't it"),
    ("youre", "you're"),
    ("Im here", "im here"),  # the table's key is "Im", compared after lower-casing: never matches
    ("  two\n", "2"),  # newlines / tabs -> spaces, stripped
    ("yes\tsir", "yes sir"),
    ('"quoted"', "quoted"),
    ("x=y+z", "x y z"),
    ("50%", "50%"),  # "%" is not in the list
    ("well...", "well"),
]


@pytest.mark.parametrize("raw, expected", NORMALIZATION_TABLE)
def test_normalize_answer_matches_the_hand_checked_table(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("prediction, humans, expected", [
    ("two", ["2"] * 3 + ["3"] * 7, 0.9),  # leave-one-out: 3 subsets with 2 matches (2/3), 7 with 3 (1)
    ("cat", ["cat"] + ["dog"] * 9, 0.3),  # 9 subsets with 1 match (1/3), one with none
    ("two", ["2"] * 10, 1.0),
    ("2.", ["2"] * 10, 1.0),
    ("t shirt", ["t-shirt"] * 4 + ["shirt"] * 6, 1.0),  # disagreeing humans are punctuation-normalized
    ("two", ["Two"] * 10, 0.0),  # unanimous humans are compared as written (OpenFlamingo's copy says 1.0)
    ("blue", ["red"] * 10, 0.0),
])
def test_question_accuracy_by_hand(prediction, humans, expected):
    assert question_accuracy(normalize_answer(prediction), humans) == pytest.approx(expected)


def _vqa_files(write_json):
    """One question per table row, ground truth in the normalized form the VQAv2 files ship; returns
    (predictions, questions, annotations) paths and the objects."""
    questions, annotations, predictions = [], [], []
    for i, (raw, normalized) in enumerate(NORMALIZATION_TABLE):
        k = 1 + i % 4  # 1..4 humans agree with the prediction: accuracies 0.3, 0.6, 0.9, 1
        answers = [normalized] * k + [f"other {j % 3}" for j in range(10 - k)]
        questions.append({"question_id": 100 + i, "image_id": 7, "question": f"question {i}?"})
        annotations.append({"question_id": 100 + i, "image_id": 7, "question_type": ["what", "how many"][i % 2],
                            "answer_type": ["other", "number", "yes/no"][i % 3], "multiple_choice_answer": normalized,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                        for j, a in enumerate(answers)]})
        predictions.append({"question_id": 100 + i, "answer": raw if i % 5 else "wrong"})
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {}}
    objects = (predictions, {**header, "questions": questions}, {**header, "annotations": annotations})
    paths = [write_json(name, obj) for name, obj in zip(("p.json", "q.json", "a.json"), objects)]
    return paths, objects


def test_accuracy_of_the_fixture_by_hand(write_json):
    _, (predictions, questions, annotations) = _vqa_files(write_json)
    result = vqa_accuracy(predictions, questions, annotations)
    per_question = [0.0 if i % 5 == 0 else [0.3, 0.6, 0.9, 1.0][i % 4] for i in range(len(NORMALIZATION_TABLE))]
    assert result["accuracy"] == pytest.approx(100 * sum(per_question) / len(per_question))
    assert result["questions"] == len(NORMALIZATION_TABLE)
    assert set(result["perAnswerType"]) == {"other", "number", "yes/no"}


def _openflamingo_vqa_metric():
    """OpenFlamingo 2.0.1's ``open_flamingo/eval/vqa_metric.py``, loaded by path (its package __init__
    imports the model stack, which the metric does not need)."""
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_flamingo is not installed (pip install --no-deps open-flamingo==2.0.1)")
    path = os.path.join(spec.submodule_search_locations[0], "eval", "vqa_metric.py")
    if not os.path.isfile(path):
        pytest.skip(f"this open_flamingo has no {path}")
    module_spec = importlib.util.spec_from_file_location("openflamingo_vqa_metric", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_score_vqa_equals_openflamingo(write_json, capsys):
    metric = _openflamingo_vqa_metric()
    (p, q, a), _ = _vqa_files(write_json)
    theirs = metric.compute_vqa_accuracy(p, q, a)  # rounded to 2 decimals, as the official code reports
    capsys.readouterr()
    assert main(["score-vqa", "--predictions", p, "--questions", q, "--annotations", a]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert round(ours["accuracy"], 2) == theirs
    assert ours["accuracy"] > 0


@pytest.mark.parametrize("case, role, words", [
    ("unknown_question", "predictions", ["entry 0", "question_id 999", "not in the questions"]),
    ("missing_answer", "predictions", ["entry 2", "'answer'"]),
    ("duplicate", "predictions", ["entry 1", "second answer"]),
    ("no_annotations_key", "annotations", ["'annotations'"]),
    ("empty", "predictions", ["empty"]),
])
def test_bad_vqa_files_exit_2_naming_file_and_entry(case, role, words, write_json, capsys):
    _, (predictions, questions, annotations) = _vqa_files(write_json)
    if case == "unknown_question":
        predictions[0]["question_id"] = 999
    elif case == "missing_answer":
        del predictions[2]["answer"]
    elif case == "duplicate":
        predictions[1]["question_id"] = predictions[0]["question_id"]
    elif case == "no_annotations_key":
        annotations = {"questions": []}
    else:
        predictions = []
    paths = {"predictions": write_json("p2.json", predictions), "questions": write_json("q2.json", questions),
             "annotations": write_json("a2.json", annotations)}
    status = main(["score-vqa", *[arg for role_, path in paths.items() for arg in (f"--{role_}", path)]])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"vlmcore-eval: error: {paths[role]}: "), err
    for word in words:
        assert word in err, err


def test_okvqa_stemming_rules():
    """OK-VQA v1.1's rules with a given tagger: the manual table wins, then -ing verbs, then plurals."""
    tagged = [("jeans", "NNS"), ("riding", "VBG"), ("running", "VBG"), ("dogs", "NNS"), ("red", "JJ"),
              ("children", "NNPS"), ("christmas", "NNS")]
    verbs = {"running": "run"}
    stemmed = stem_tagged_words(tagged, lambda w: verbs[w], lambda w: {"dogs": "dog", "children": "child"}[w])
    assert stemmed == "jean ride run dog red child christmas"


def test_okvqa_stemming_without_nltk_fails_clearly(write_json, capsys):
    if importlib.util.find_spec("nltk") and importlib.util.find_spec("inflection"):
        pytest.skip("nltk and inflection are installed: the missing-package message cannot be seen")
    (p, q, a), _ = _vqa_files(write_json)
    assert main(["score-vqa", "--okvqa-stemming", "--predictions", p, "--questions", q, "--annotations", a]) == 2
    err = capsys.readouterr().err
    assert "OK-VQA stemming needs nltk and inflection" in err


@pytest.mark.slow  # two fresh interpreters importing torch
def test_the_console_command_prints_one_json_line_last(write_json, tmp_path):
    """Through ``python -m vlmcore.eval`` as scripts run it: exit 0, the result on stdout's last line."""
    import subprocess
    import sys

    (p, q, a), _ = _vqa_files(write_json)
    done = subprocess.run([sys.executable, "-m", "vlmcore.eval", "score-vqa", "--predictions", p, "--questions", q,
                           "--annotations", a], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout.strip().splitlines()[-1])) >= {"accuracy", "perAnswerType", "questions"}
    bad = subprocess.run([sys.executable, "-m", "vlmcore.eval", "score-vqa", "--predictions", q, "--questions", q,
                          "--annotations", a], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.startswith(f"vlmcore-eval: error: {q}: ")
