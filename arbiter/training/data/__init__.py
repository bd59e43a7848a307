"""Preference data: loading, converting, tokenising and collating (prompt, chosen, rejected) pairs.

Everything that feeds training goes through here:

* ``load_pairs(source)`` reads TRL-format files (.jsonl / .json / .parquet; ``prompt``/``chosen``/``rejected``
  as text or as chat-message lists, including TRL's implicit-prompt form) or a builtin dataset under the
  shared data root (hh-rlhf, PandaLM, multiple-choice sets and SST-2 converted to pairs).
* ``load_choices`` / ``choices_to_pairs``: multiple-choice questions and the DPH paper's recipe for turning
  them into pairs (chosen = the correct option, rejected = a wrong option drawn uniformly, seeded).
* ``load_math`` / ``extract_final_answer`` / ``sample_math_pairs``: verifiable math problems and pairs made
  from the model's own samples (a correct sample vs an incorrect one), sampled by the server's engine
  (``arbiter.training.sampling``) and paired by ``pair_math_samples``.
* ``tokenize_pairs`` / ``collate_pairs``: THE tokenisation (``arbiter.backbone.encode_chat``) and padding.

Bad rows are never silently dropped and never crash a run: each is counted in a ``DataReport`` under a
reason with up to three short examples; a source with zero usable rows raises ``DataError`` naming the counts.

The data root is ``$ARBITER_DATA_DIR``, else ``/work/shared/data`` if it exists, else ``<repo>/../shared/data``.
"""

from arbiter.answers import (
    canonical_number,
    extract_final_answer,
)

from .choice import (
    CHOICE_BUILTINS,
    LETTERS,
    SST2_LABELS,
    ChoiceQuestion,
    choices_to_pairs,
    load_choices,
    mc_prompt,
    sst2_prompt,
)
from .io import (
    data_root,
)
from .math import (
    MATH_BUILTINS,
    MathProblem,
    is_correct,
    load_math,
    math_prompt,
    pair_math_samples,
    sample_math_pairs,
)
from .pairs import (
    PAIR_BUILTINS,
    load_pairs,
    save_pairs,
    split_pairs,
)
from .records import (
    HH_SPLITS,
    MAX_EXAMPLES,
    DataError,
    DataReport,
    PreferencePair,
    TokenizedPair,
)
from .rows import (
    hh_to_pair,
    parse_hh_dialogue,
    row_to_pair,
)
from .tokenize import (
    collate_pairs,
    collate_texts,
    tokenize_pairs,
)

__all__ = [
    "CHOICE_BUILTINS",
    "ChoiceQuestion",
    "DataError",
    "DataReport",
    "HH_SPLITS",
    "LETTERS",
    "MATH_BUILTINS",
    "MAX_EXAMPLES",
    "MathProblem",
    "PAIR_BUILTINS",
    "PreferencePair",
    "SST2_LABELS",
    "TokenizedPair",
    "canonical_number",
    "choices_to_pairs",
    "collate_pairs",
    "collate_texts",
    "data_root",
    "extract_final_answer",
    "hh_to_pair",
    "is_correct",
    "load_choices",
    "load_math",
    "load_pairs",
    "math_prompt",
    "mc_prompt",
    "parse_hh_dialogue",
    "row_to_pair",
    "pair_math_samples",
    "sample_math_pairs",
    "save_pairs",
    "split_pairs",
    "sst2_prompt",
    "tokenize_pairs",
]
