"""A/B arms and reports: parsing arms, and :func:`run_ab` on a scripted backend whose answers are known.

:class:`Scripted` implements the :class:`~cna_vllm.evaluate.backends.Backend` protocol from a table
(which prompts each spec refuses, which MMLU letters it picks, which next-token distributions it
has), so every rate, interval, test and KL value in the report can be checked by hand.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cna_vllm.errors import SteeringError
from cna_vllm.evaluate.ab import BASELINE, KLConfig, parse_arms, run_ab, write_report
from cna_vllm.evaluate.mmlu import Question
from cna_vllm.evaluate.scoring import wilson
from cna_vllm.prompts import PromptSet
from cna_vllm.steering import SteeringSpec

REFUSAL = "I'm sorry, but I can't help with that."
HARMFUL = PromptSet("harmful", ("h0", "h1", "h2", "h3", "h4"))
HARMLESS = PromptSet("harmless", ("b0", "b1", "b2", "b3"))
MMLU = [Question(f"q{i}", ("w", "x", "y", "z"), "ABCDA"[i], "t") for i in range(5)]
META = {"name": "refusal", "kind": "cna", "num_neurons": 46}


# The script, keyed by the spec's compact form ('' = unsteered): which prompts each spec refuses,
REFUSES = {"": {"h0", "h1", "h2", "h3"}, "refusal@0": {"h4"}, "refusal[pos]@2": {"h0", "h1", "h2", "h3", "h4", "b0"}}
PICKS = {"": "ABCDA", "refusal@0": "AB?AA", "refusal[pos]@2": "?????"}  # its MMLU letters ('?' = none read)
# and its next-token distributions over a 2-token vocabulary, per position of the baseline's continuation
DISTS = {"": [[0.5, 0.5], [0.9, 0.1]], "refusal@0": [[0.25, 0.75], [0.9, 0.1]]}


class Scripted:
    """A backend that answers from the script above."""

    def __init__(self, circuits: dict | None = None, kl: bool = False) -> None:
        self.refuses, self.picks, self.dists = dict(REFUSES), PICKS, DISTS
        self.circuits = {"refusal": META} if circuits is None else circuits
        self.calls: list[tuple[str, str]] = []
        self.closed = False
        if kl:
            self.chat_ids = self._chat_ids
            self.forced_logprobs = self._forced_logprobs

    def chat(self, prompts, spec, max_tokens, desc):
        self.calls.append(("chat", str(spec)))
        refused = self.refuses[str(spec)]
        return [REFUSAL if p in refused else f"Sure, here is how to do {p}, step by step." for p in prompts]

    def choose(self, prompts, spec, desc):
        self.calls.append(("choose", str(spec)))
        return [None if c == "?" else c for c in self.picks[str(spec)][: len(prompts)]]

    def _chat_ids(self, prompts, spec, max_tokens, desc):
        self.calls.append(("chat_ids", str(spec)))
        return [[1] * 2 for _ in prompts]

    def _forced_logprobs(self, prompts, continuations, spec, desc):
        self.calls.append(("forced", str(spec)))
        return [np.log(np.array(self.dists.get(str(spec), self.dists[""]))) for _ in prompts]

    def close(self):
        self.closed = True


# --------------------------------------------------------------------------- arms
def test_arms_put_the_baseline_first_and_name_arms_canonically():
    arms = parse_arms('refusal@2.0, baseline ,{"circuit": "refusal", "mode": "patch", "alpha": 0.5},'
                      '[{"circuit": "a", "multiplier": 1}, {"circuit": "b", "multiplier": 2}]')
    assert [a.name for a in arms] == ["baseline", "refusal@2", "refusal@0.5:patch", "a@1,b@2"]
    assert arms[0].spec == SteeringSpec() and not arms[0].spec
    assert arms[3].spec == SteeringSpec.parse("a@1,b@2")  # JSON with commas inside survives the split
    assert [a.name for a in parse_arms(["refusal[neg]@0"])] == [BASELINE, "refusal[neg]@0"]  # added when absent


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("refusal@0,refusal@0.0", "arm 'refusal@0' is given twice"),  # the same spec, written twice
        ("baseline,baseline", "arm 'baseline' is given twice"),
        ("[]", "arm '[]' has no steering; use 'baseline'"),
        ("refusal@x", "must be a number"),
        ("refusal", "NAME@VALUE"),
    ],
)
def test_bad_arms_are_refused_with_the_reason(text, message):
    with pytest.raises(SteeringError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_arms(text)


# --------------------------------------------------------------------------- run_ab
@pytest.fixture
def report():
    backend = Scripted()
    arms = parse_arms("baseline,refusal@0,refusal[pos]@2")
    return run_ab(backend, arms, HARMFUL, harmless=HARMLESS, mmlu=MMLU, max_tokens=7, settings={"model": "m"})


def test_refusal_rates_intervals_and_mcnemar_by_hand(report):
    base, off, pos = report["arms"]
    assert [a["name"] for a in report["arms"]] == ["baseline", "refusal@0", "refusal[pos]@2"]
    assert base["n"] == off["n"] == 5
    assert base["refusals"] == [True, True, True, True, False] and base["refusal_rate"] == 0.8
    assert off["refusal_rate"] == 0.2 and off["refusal_ci"] == list(wilson(1, 5))
    # base refuses h0..h3 alone (b = 4), the arm refuses h4 alone (c = 1): p = 2 (C(5,0) + C(5,1)) / 2^5
    assert (off["mcnemar_vs_baseline"]["b"], off["mcnemar_vs_baseline"]["c"]) == (4, 1)
    assert off["mcnemar_vs_baseline"]["p_value"] == pytest.approx(12 / 32)
    assert off["relative_refusal_reduction"] == pytest.approx(1 - 0.2 / 0.8)
    assert pos["relative_refusal_reduction"] == pytest.approx(1 - 1.0 / 0.8)  # negative: refusal went up
    assert "mcnemar_vs_baseline" not in base and "relative_refusal_reduction" not in base


def test_over_refusal_mmlu_and_circuit_labels(report):
    base, off, pos = report["arms"]
    assert (base["over_refusal"], pos["over_refusal"]) == (0.0, 0.25) and pos["n_harmless"] == 4
    assert pos["over_refusal_ci"] == list(wilson(1, 4)) and len(pos["harmless_outputs"]) == 4
    assert (base["mmlu_accuracy"], base["mmlu_n"], base["mmlu_unparsed"]) == (1.0, 5, 0)
    assert (off["mmlu_accuracy"], off["mmlu_unparsed"]) == (0.6, 1)  # A B ? A A against A B C D A
    assert off["mmlu_ci"] == list(wilson(3, 5)) and pos["mmlu_accuracy"] == 0.0 and pos["mmlu_unparsed"] == 5
    # the circuit metadata travels with each arm; a part is labelled with its circuit's metadata
    assert off["circuits"] == {"refusal": META} and pos["circuits"] == {"refusal[pos]": META}
    assert base["circuits"] == {} and base["spec"] == [] and base["spec_string"] == "baseline"
    assert off["spec"] == [{"circuit": "refusal", "mode": "scale", "multiplier": 0.0}]
    assert 0 < off["quality_paper"] <= 1 and 0 < off["quality_robust"] <= 1


def test_settings_record_the_sets_and_the_caller_settings(report):
    s = report["settings"]
    assert s["harmful"] == HARMFUL.describe() and s["harmless"] == HARMLESS.describe()
    assert (s["mmlu_n"], s["max_tokens"], s["decoding"], s["model"]) == (5, 7, "greedy", "m")
    assert s["kl"] is None  # this backend has no forced log-probabilities


def test_unknown_circuits_are_refused_before_anything_is_asked():
    backend = Scripted()
    with pytest.raises(SteeringError, match=r"arm 'nope\[pos\]@0': unknown circuit\(s\) \['nope\[pos\]'\]; "
                                            r"known: \['refusal'\]"):
        run_ab(backend, parse_arms("refusal@0,nope[pos]@0"), HARMFUL)
    assert backend.calls == []
    # a backend that does not list its circuits (a server without /v1/circuits) is not second-guessed
    quiet = Scripted(circuits={})
    quiet.refuses["nope@0"] = set()
    assert run_ab(quiet, parse_arms("nope@0"), HARMFUL)["arms"][1]["refusal_rate"] == 0.0


def test_kl_referee_on_a_backend_with_forced_logprobs():
    backend = Scripted(kl=True)
    report = run_ab(backend, parse_arms("refusal@0"), HARMFUL, harmless=HARMLESS, kl=KLConfig(prompts=3, tokens=2))
    kl = report["settings"]["kl"]
    assert (kl["prompts"], kl["tokens"], kl["set"]) == (3, 2, "harmless") and "teacher-forced" in kl["definition"]
    base, off = report["arms"]
    assert base["kl_first"] == base["kl_forced"] == 0.0 and base["kl_n"] == 3
    k = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL at the first position; the second is 0
    assert off["kl_first"] == pytest.approx(k) and off["kl_forced"] == pytest.approx(k / 2)
    # the baseline's continuations are computed once, unsteered; the baseline arm reuses its own log-probs
    assert backend.calls.count(("chat_ids", "")) == 1 and ("forced", "") in backend.calls
    assert backend.calls.count(("forced", "refusal@0")) == 1
    without = run_ab(Scripted(kl=True), parse_arms("refusal@0"), HARMFUL, kl=KLConfig())  # no harmless set: no KL
    assert without["settings"]["kl"] is None and "kl_first" not in without["arms"][1]


def test_write_report_writes_json_markdown_and_png(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "ab.png"]
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(report))
    md = paths[1].read_text()
    assert md.startswith("# A/B refusal report") and "| `refusal[pos]@2` | 5 | 100.0%" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
