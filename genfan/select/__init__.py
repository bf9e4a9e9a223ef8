"""Selection: score the candidates of a fan-out and pick the best.

The fan-out hands every candidate (answers and typed failures) to a [`Selector`][genfan.select.Selector].
[`Select`][genfan.select.Select] combines weighted [`Scorer`][genfan.select.Scorer] s (vote, consensus, judge, schema,
heuristics, any function), hard filters and a tie-break, and explains its pick.
[`Synthesis`][genfan.Synthesis] (Mixture-of-Agents) and [`Cascade`][genfan.Cascade] (FrugalGPT) are modes built on them.

Everything beyond the core types loads on first use.
"""

from typing import TYPE_CHECKING

from genfan._facade import lazy

if TYPE_CHECKING:
    from ._auto import DEFAULT_CALIBRATION as DEFAULT_CALIBRATION
    from ._auto import AutoAgreementKey as AutoAgreementKey
    from ._auto import AutoSelect as AutoSelect
    from ._auto import Weighting as Weighting
    from ._base import Candidate as Candidate
    from ._base import CandidateStatus as CandidateStatus
    from ._base import FirstSuccess as FirstSuccess
    from ._base import Selection as Selection
    from ._base import Selector as Selector
    from ._base import SelectorLike as SelectorLike
    from ._base import as_selector as as_selector
    from ._confidence import Calibration as Calibration
    from ._confidence import ReliabilityBin as ReliabilityBin
    from ._confidence import answer_confidence as answer_confidence
    from ._confidence import answer_logprobs as answer_logprobs
    from ._confidence import expected_calibration_error as expected_calibration_error
    from ._confidence import reliability_table as reliability_table
    from ._confidence import sequence_confidence as sequence_confidence
    from ._consensus import Consensus as Consensus
    from ._consensus import char_ngram_jaccard as char_ngram_jaccard
    from ._consensus import rouge_l as rouge_l
    from ._consensus import token_jaccard as token_jaccard
    from ._extract import Extractor as Extractor
    from ._extract import FinalNumber as FinalNumber
    from ._extract import Normalized as Normalized
    from ._extract import NovelWords as NovelWords
    from ._extract import RegexExtract as RegexExtract
    from ._extract import as_extractor as as_extractor
    from ._extract import normalize_text as normalize_text
    from ._extract import numbers_in as numbers_in
    from ._factory import SELECTOR_NAMES as SELECTOR_NAMES
    from ._factory import selector_from_name as selector_from_name
    from ._forms import AnswerForm as AnswerForm
    from ._forms import AnswerKind as AnswerKind
    from ._forms import Extracted as Extracted
    from ._forms import extract_answer as extract_answer
    from ._forms import infer_form as infer_form
    from ._forms import parse_options as parse_options
    from ._heuristics import Finished as Finished
    from ._heuristics import LengthBounds as LengthBounds
    from ._heuristics import Patterns as Patterns
    from ._heuristics import RefusalDetector as RefusalDetector
    from ._judge import JudgeStatistics as JudgeStatistics
    from ._judge import LLMJudge as LLMJudge
    from ._judge import parse_rating as parse_rating
    from ._judge import parse_verdict as parse_verdict
    from ._schema import SchemaValid as SchemaValid
    from ._schema import extract_json as extract_json
    from ._scorer import CandidateScorer as CandidateScorer
    from ._scorer import FunctionScorer as FunctionScorer
    from ._scorer import Score as Score
    from ._scorer import Scorer as Scorer
    from ._scorer import ScorerLike as ScorerLike
    from ._scorer import as_scorer as as_scorer
    from ._scorer import run_scorer as run_scorer
    from ._scorer import scorer as scorer
    from ._select import Select as Select
    from ._select import TieBreak as TieBreak
    from ._stopping import AdaptiveConsistency as AdaptiveConsistency
    from ._stopping import CannotLose as CannotLose
    from ._stopping import ConfidenceEstimator as ConfidenceEstimator
    from ._stopping import Majority as Majority
    from ._stopping import StoppingRule as StoppingRule
    from ._stopping import VoteCounter as VoteCounter
    from ._stopping import Waves as Waves
    from ._stopping import beta_leader_probability as beta_leader_probability
    from ._stopping import regularized_beta as regularized_beta
    from ._vote import AgreementKey as AgreementKey
    from ._vote import MajorityVote as MajorityVote

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
