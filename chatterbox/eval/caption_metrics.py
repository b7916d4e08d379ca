"""Captioning metrics for referring (region description): BLEU-1..4, METEOR, ROUGE-L, CIDEr.

The procedure is the refer toolkit's ``RefEvaluation`` (what upstream's ``utils/test.py`` runs), with
pycocoevalcap 1.2 (the same scorers and byte-identical jars, spec/evaluation_reference.md §4):

1. references per ref_id: the RefCOCOg sentences, ascii-ignored; hypothesis: one sentence per ref_id;
2. the Stanford PTB tokenizer (``-preserveLines -lowerCase``, punctuation tokens dropped) on the
   hypotheses, then on the references;
3. Bleu(4) ('closest' reference length), Meteor 1.5 (``-l en -norm``), Rouge-L (beta 1.2),
   Cider (plain CIDEr, sigma 6, idf from the references of the evaluated set).

Upstream's raw_output files carry each reference as ``sent.lower() + "."``; :func:`refer_reference`
("gt=refer") turns it back into refer's ``sent``, which reproduces the published numbers to the last
digit. ``gt="asis"`` scores the strings as stored (values move by <= 3e-5).

Metrics are corpus-level over the ids given, so a multi-round evaluator calls
:meth:`CaptionScorer.score` once per round (CIDEr's idf then comes from that round's references).
The scorer keeps one METEOR Java process for all its calls: start-up and the paraphrase table are
paid once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Hashable, Mapping, Sequence

__all__ = [
    "METRIC_KEYS",
    "REFERENCE_PROCEDURES",
    "ReferringInputError",
    "refer_reference",
    "CaptionScorer",
    "read_referring_predictions",
    "read_referring_references",
    "bertscore_availability",
    "compute_bertscore",
    "optional_bertscore",
]

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
REFERENCE_PROCEDURES = ("refer", "asis")


class ReferringInputError(ValueError):
    """A referring predictions/references file that cannot be scored as is (names file, entry, field)."""


def refer_reference(gt_sentence: str) -> str:
    """One raw_output ``gt`` string -> refer's sentence: drop the one appended "." and non-ASCII characters.

    refer's RefEvaluation encodes each sentence with ``encode('ascii', 'ignore')``; raw_output
    stores ``sent.lower() + "."``, and refer's sentences are already lower case.
    """
    sentence = gt_sentence[:-1] if gt_sentence.endswith(".") else gt_sentence
    return sentence.encode("ascii", "ignore").decode("ascii")


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def _check_pairs(references: Mapping, hypotheses: Mapping) -> None:
    missing = [k for k in references if k not in hypotheses]
    extra = [k for k in hypotheses if k not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference id(s) without a prediction (first: {missing[:5]})")
        if extra:
            parts.append(f"{len(extra)} predicted id(s) without references (first: {extra[:5]})")
        raise ReferringInputError("predictions and references do not cover the same ids: " + "; ".join(parts))
    if not references:
        raise ReferringInputError("nothing to score: no ids")
    for k, refs in references.items():
        if not isinstance(refs, (list, tuple)) or not refs or not all(isinstance(s, str) for s in refs):
            raise ReferringInputError(f"references[{k!r}]: expected a non-empty list of strings, got {refs!r}")
    for k, hyp in hypotheses.items():
        if not isinstance(hyp, str):
            raise ReferringInputError(f"predictions[{k!r}]: expected a string, got {hyp!r}")


class CaptionScorer:
    """BLEU-1..4 / METEOR / ROUGE-L / CIDEr with pycocoevalcap; reusable across many :meth:`score` calls.

    Use as a context manager (or call :meth:`close`) to stop the METEOR Java process.
    """

    def __init__(self, with_meteor: bool = True):
        self._with_meteor = with_meteor
        self._meteor = None

    def __enter__(self) -> "CaptionScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._meteor is not None:
            meteor, self._meteor = self._meteor, None
            # pycocoevalcap stops the Java process in __del__ (safe to run again at garbage collection).
            meteor.__del__()

    def _meteor_scorer(self):
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return self._meteor

    @staticmethod
    def tokenize(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]):
        """PTB-tokenize (lower case, punctuation dropped): hypotheses first, then references, as refer."""
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        res = tokenizer.tokenize({k: [{"caption": h}] for k, h in hypotheses.items()})
        gts = tokenizer.tokenize({k: [{"caption": s} for s in refs] for k, refs in references.items()})
        # A hypothesis that is empty is not written as a line by the tokenizer's zip; keep it empty.
        for k in hypotheses:
            res.setdefault(k, [""])
        for k, refs in references.items():
            if len(gts.get(k, ())) != len(refs) or len(res[k]) != 1:
                raise RuntimeError(f"PTB tokenizer output does not line up with the input at id {k!r}")
        return gts, res

    def score(
        self,
        references: Mapping[Hashable, Sequence[str]],
        hypotheses: Mapping[Hashable, str],
        *,
        per_item: bool = False,
    ) -> dict:
        """Corpus scores (unrounded floats, keys :data:`METRIC_KEYS`) of one hypothesis per id.

        ``references`` and ``hypotheses`` must have the same ids; both are raw strings (tokenized
        here). With ``per_item``, also ``{"per_item": {metric: {id: score}}}``.
        """
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        _check_pairs(references, hypotheses)
        gts, res = self.tokenize(references, hypotheses)
        ids = list(gts.keys())
        results: dict = {}
        per: dict = {}

        bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            results[f"Bleu_{n + 1}"] = float(bleu[n])
            per[f"Bleu_{n + 1}"] = bleu_items[n]
        if self._with_meteor:
            meteor, meteor_items = self._meteor_scorer().compute_score(gts, res)
            results["METEOR"], per["METEOR"] = float(meteor), meteor_items
        rouge, rouge_items = Rouge().compute_score(gts, res)
        results["ROUGE_L"], per["ROUGE_L"] = float(rouge), rouge_items
        cider, cider_items = Cider().compute_score(gts, res)
        results["CIDEr"], per["CIDEr"] = float(cider), cider_items
        if per_item:
            results["per_item"] = {m: {k: float(v) for k, v in zip(ids, vals)} for m, vals in per.items()}
        return results


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _load_json(path: str | Path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ReferringInputError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ReferringInputError(f"{path}: not valid JSON ({e})") from None


def _ref_id(entry: Mapping, where: str) -> str:
    if "ref_id" not in entry:
        raise ReferringInputError(f"{where}: missing field 'ref_id'")
    rid = entry["ref_id"]
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        raise ReferringInputError(f"{where}.ref_id: expected an int or string, got {rid!r}")
    return str(rid)  # ids are compared as strings: JSON object keys are always strings


def _add_unique(out: dict, key: str, value, where: str) -> None:
    if key in out:
        raise ReferringInputError(f"{where}: duplicate ref_id {key!r}")
    out[key] = value


def _is_raw_output(data) -> bool:
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "text_output" in data[0]


def read_referring_predictions(path: str | Path) -> dict[str, str]:
    """``{ref_id: sentence}`` from upstream's raw_output list (``text_output``) or a
    ``{"predictions": [{"sent", "ref_id"}]}`` file (modify_output / clean_output / ours)."""
    data = _load_json(path)
    out: dict[str, str] = {}
    if _is_raw_output(data):
        field, entries = "text_output", data
    elif isinstance(data, dict) and isinstance(data.get("predictions"), list):
        field, entries = "sent", data["predictions"]
    else:
        raise ReferringInputError(
            f"{path}: expected upstream's raw_output list (entries with 'text_output') or "
            '{"predictions": [{"sent", "ref_id"}]}'
        )
    for i, e in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(e, dict):
            raise ReferringInputError(f"{where}: expected an object, got {type(e).__name__}")
        if field not in e:
            raise ReferringInputError(f"{where}: missing field {field!r}")
        if not isinstance(e[field], str):
            raise ReferringInputError(f"{where}.{field}: expected a string, got {e[field]!r}")
        _add_unique(out, _ref_id(e, where), e[field], where)
    if not out:
        raise ReferringInputError(f"{path}: no predictions")
    return out


def read_referring_references(path: str | Path, procedure: str = "refer") -> dict[str, list[str]]:
    """``{ref_id: [reference sentences]}`` from upstream's raw_output list (field ``gt``) or a
    ``{ref_id: [sentences]}`` JSON object. ``procedure``: "refer" rebuilds refer's sentences from
    raw_output's ``gt`` (see :func:`refer_reference`); "asis" keeps the strings as stored."""
    if procedure not in REFERENCE_PROCEDURES:
        raise ValueError(f"procedure={procedure!r}; expected one of {REFERENCE_PROCEDURES}")
    data = _load_json(path)
    out: dict[str, list[str]] = {}
    if isinstance(data, list):
        for i, e in enumerate(data):
            where = f"{path}: entry {i}"
            if not isinstance(e, dict):
                raise ReferringInputError(f"{where}: expected an object, got {type(e).__name__}")
            if "gt" not in e:
                raise ReferringInputError(f"{where}: missing field 'gt'")
            gt = e["gt"]
            if not isinstance(gt, list) or not gt or not all(isinstance(s, str) for s in gt):
                raise ReferringInputError(f"{where}.gt: expected a non-empty list of strings, got {gt!r}")
            refs = [refer_reference(s) for s in gt] if procedure == "refer" else list(gt)
            _add_unique(out, _ref_id(e, where), refs, where)
    elif isinstance(data, dict) and "predictions" not in data:
        for key, gt in data.items():
            if not isinstance(gt, list) or not gt or not all(isinstance(s, str) for s in gt):
                raise ReferringInputError(f"{path}: [{key!r}]: expected a non-empty list of strings, got {gt!r}")
            # A plain mapping already holds the sentences themselves; only ascii-ignore them for "refer".
            out[str(key)] = [s.encode("ascii", "ignore").decode("ascii") for s in gt] if procedure == "refer" else gt
    else:
        raise ReferringInputError(f"{path}: expected upstream's raw_output list (entries with 'gt') or {{ref_id: [sentences]}}")
    if not out:
        raise ReferringInputError(f"{path}: no references")
    return out


# ----------------------------------------------------------------------------------------------
# BERTScore (optional: only with the bert_score package and its model already on disk)
# ----------------------------------------------------------------------------------------------


def bertscore_availability(model_type: str | None = None) -> tuple[bool, str]:
    """(available, reason). Never downloads: the model must already be in the local HF cache."""
    try:
        import bert_score  # noqa: F401
        from bert_score.utils import lang2model
    except ImportError:
        return False, "the bert_score package is not installed"
    model_type = model_type or lang2model["en"]
    if Path(model_type, "config.json").is_file():  # a model folder on disk
        return True, f"model {model_type!r} found locally"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False, "huggingface_hub is not installed"
    try:
        cached = try_to_load_from_cache(model_type, "config.json")
    except ValueError as e:  # not a hub repo id (e.g. a path that does not exist)
        return False, f"model {model_type!r} is neither a local folder nor a hub id ({e})"
    if not isinstance(cached, str):
        return False, f"model {model_type!r} is not in the local Hugging Face cache (it is never downloaded)"
    return True, f"model {model_type!r} found locally"


def compute_bertscore(
    references: Mapping[Hashable, Sequence[str]],
    hypotheses: Mapping[Hashable, str],
    model_type: str | None = None,
) -> float:
    """Mean BERTScore F1 as upstream's utils/bert_score.py: the references of an id are joined with
    " And " into one string; ``lang="en"`` defaults (no idf, no baseline rescaling)."""
    ok, reason = bertscore_availability(model_type)
    if not ok:
        raise RuntimeError(f"BERTScore unavailable: {reason}")
    _check_pairs(references, hypotheses)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bert_score import score

    ids = list(references)
    cands = [hypotheses[k] for k in ids]
    refs = [" And ".join(references[k]) for k in ids]
    kwargs = {"model_type": model_type} if model_type else {"lang": "en"}
    _, _, f1 = score(cands, refs, **kwargs)
    return float(f1.mean())


def optional_bertscore(
    references: Mapping[Hashable, Sequence[str]],
    hypotheses: Mapping[Hashable, str],
    availability: tuple[bool, str] | None = None,
) -> dict:
    """The BERTScore fields of a report: ``{"BERTScore_F1": mean F1}`` when bert_score and its model are
    on disk, else ``{"BERTScore_F1": None, "bertscore_unavailable": reason}`` (nothing is downloaded).
    ``availability``: a :func:`bertscore_availability` result already at hand (checked once per run)."""
    available, reason = availability if availability is not None else bertscore_availability()
    if not available:
        return {"BERTScore_F1": None, "bertscore_unavailable": reason}
    return {"BERTScore_F1": compute_bertscore(references, hypotheses)}
