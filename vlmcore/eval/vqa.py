"""VQA accuracy exactly as the official VQA evaluation computes it (``vqaEval.py``, GT-Vision-Lab/VQA).

Per question: the predicted answer is normalized (:func:`normalize_answer`); each of the human answers
is left out in turn and the prediction scores ``min(#matches among the other humans / 3, 1)``; the
question's accuracy is the mean over those 10-choose-9 subsets. The overall accuracy (percent) is the
mean over the predicted questions. Two details of the official code are kept on purpose:

- the human answers are only punctuation-normalized, and only when they disagree (the released
  annotations are normalized already); OpenFlamingo's copy normalizes them always, which differs only
  on un-normalized annotations;
- the period rule runs ``re.sub(..., count=32)`` (the official code passes ``re.UNICODE`` as count).

OK-VQA: ``okvqa_stemming=True`` first stems the prediction with the OK-VQA v1.1 procedure (NLTK's
tokenizer, part-of-speech tagger and WordNet lemmatizer + ``inflection``, with OK-VQA's manual table),
as OpenFlamingo does before scoring OK-VQA; the released OK-VQA answers are stemmed the same way.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

from vlmcore.eval.inputs import EvalInputError, MissingToolError, require_keys, require_list
from vlmcore.eval.vqa_tables import ARTICLES, CONTRACTIONS, NUMBER_WORDS, OKVQA_MANUAL_STEMS, PUNCTUATION

# The official patterns, verbatim: "(?!<=\d)" is a look-ahead (not a look-behind) in the original too.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
OFFICIAL_PERIOD_COUNT = 32  # the official code passes re.UNICODE (= 32) where re.sub takes its count


def strip_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each punctuation mark is deleted when it touches a space
    (or the text has a digit-comma-digit), else replaced by a space; then periods not before a digit go."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=OFFICIAL_PERIOD_COUNT)


def normalize_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, articles dropped,
    apostrophe-less contractions restored, words re-joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation compares it: newlines / tabs to spaces, stripped,
    :func:`strip_punctuation`, then :func:`normalize_digits_articles` (``"Two dogs."`` -> ``"2 dogs"``)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_digits_articles(strip_punctuation(text))


def question_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Accuracy in [0, 1] of one normalized ``prediction`` against the humans' raw answers (10 in VQA)."""
    if len(set(human_answers)) > 1:  # the official code leaves unanimous answers exactly as written
        human_answers = [strip_punctuation(a) for a in human_answers]
    scores = []
    for left_out in range(len(human_answers)):
        others = human_answers[:left_out] + human_answers[left_out + 1:]
        scores.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(scores) / len(scores)


def stem_tagged_words(tagged: list[tuple[str, str]], lemmatize_verb: Callable[[str], str],
                      singularize: Callable[[str], str]) -> str:
    """OK-VQA v1.1's rules over ``(word, part-of-speech tag)`` pairs: the manual table first, then
    ``-ing`` words as verbs through the lemmatizer, plural nouns (NNS / NNPS) singularized."""
    out = []
    for word, tag in tagged:
        if word in OKVQA_MANUAL_STEMS:
            word = OKVQA_MANUAL_STEMS[word]
        elif word.endswith("ing"):
            word = lemmatize_verb(word)
        elif tag.startswith(("NNS", "NNPS")):
            word = singularize(word)
        out.append(word)
    return " ".join(out)


def okvqa_stemmer() -> Callable[[str], str]:
    """``text -> stemmed text`` with NLTK + inflection; a MissingToolError says what is missing."""
    try:
        import inflection
        import nltk
        from nltk.corpus.reader import VERB
    except ImportError as e:
        raise MissingToolError(f"OK-VQA stemming needs nltk and inflection (pip install nltk inflection): {e}") from e
    lemmatizer = nltk.stem.WordNetLemmatizer()

    def stem(text: str) -> str:
        try:
            tagged = nltk.pos_tag(nltk.tokenize.word_tokenize(text))
            return stem_tagged_words(tagged, lambda w: lemmatizer.lemmatize(w, VERB), inflection.singularize)
        except LookupError as e:  # NLTK's data (punkt, the tagger, WordNet) is a separate download
            raise MissingToolError("OK-VQA stemming needs NLTK's data (python -m nltk.downloader punkt_tab "
                               f"averaged_perceptron_tagger_eng wordnet), not found here: {e}") from e

    return stem


def _index(entries: list, role: str, what: str, keys: tuple[str, ...]) -> dict:
    """``{question_id: entry}`` of a VQA questions / annotations list."""
    out = {}
    for i, entry in enumerate(require_list(entries, role, what)):
        out[require_keys(entry, keys, role, f"{what}[{i}]")["question_id"]] = entry
    return out


def _human_answers(annotation: dict, question_id) -> list[str]:
    """The raw answer strings of one VQA annotation (``answers: [{"answer": str, ...}]``)."""
    answers = annotation["answers"]
    if not isinstance(answers, list) or not answers:
        raise EvalInputError("annotations", f"question_id {question_id!r}: 'answers' is not a non-empty list")
    if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise EvalInputError("annotations", f"question_id {question_id!r}: each answer needs an 'answer' string")
    return [a["answer"] for a in answers]


def vqa_accuracy(predictions: list[dict], questions: dict, annotations: dict, *,
                 okvqa_stemming: bool = False) -> dict:
    """Official VQA accuracy of ``predictions``.

    Args:
        predictions: ``[{"question_id": id, "answer": str}, ...]`` (the VQA results format), one per question.
        questions: a VQA questions file, ``{"questions": [{"question_id", "image_id", "question"}, ...]}``.
        annotations: a VQA annotations file, ``{"annotations": [{"question_id", "answers": [{"answer"}...],
            "question_type", "answer_type"}, ...]}`` (missing types count as "other").
        okvqa_stemming: stem each prediction as OK-VQA does first (see the module docstring).

    Returns:
        ``{"accuracy": percent, "perAnswerType": {type: percent}, "perQuestionType": {type: percent},
        "questions": n}`` over the predicted questions (percentages unrounded; the official code rounds to 2).
    """
    asked = _index(require_keys(questions, ("questions",), "questions", "the top-level object")["questions"],
                   "questions", "questions", ("question_id",))
    answered = _index(require_keys(annotations, ("annotations",), "annotations", "the top-level object")["annotations"],
                      "annotations", "annotations", ("question_id", "answers"))
    stem = okvqa_stemmer() if okvqa_stemming else None
    seen: set = set()
    scores, by_answer_type, by_question_type = [], defaultdict(list), defaultdict(list)
    for i, pred in enumerate(require_list(predictions, "predictions", "predictions")):
        qid = require_keys(pred, ("question_id", "answer"), "predictions", f"entry {i}")["question_id"]
        for role, index in (("questions", asked), ("annotations", answered)):
            if qid not in index:
                raise EvalInputError("predictions", f"entry {i}: question_id {qid!r} is not in the {role}")
        if qid in seen:
            raise EvalInputError("predictions", f"entry {i}: a second answer for question_id {qid!r}")
        if not isinstance(pred["answer"], str):
            raise EvalInputError("predictions", f"entry {i} (question_id {qid!r}): 'answer' is not a string")
        seen.add(qid)
        answer = stem(pred["answer"]) if stem else pred["answer"]
        score = question_accuracy(normalize_answer(answer), _human_answers(answered[qid], qid))
        scores.append(score)
        by_answer_type[answered[qid].get("answer_type", "other")].append(score)
        by_question_type[answered[qid].get("question_type", "other")].append(score)

    def percent(values: list[float]) -> float:
        return 100 * sum(values) / len(values)

    return {"accuracy": percent(scores), "perAnswerType": {k: percent(v) for k, v in by_answer_type.items()},
            "perQuestionType": {k: percent(v) for k, v in by_question_type.items()}, "questions": len(scores)}
