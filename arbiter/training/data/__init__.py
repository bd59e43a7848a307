"""Preference data: loading, converting, tokenising and collating (prompt, chosen, rejected) pairs.

Everything that feeds training goes through here:

* ``load_pairs(source)`` reads TRL-format files (.jsonl / .json / .parquet; ``prompt``/``chosen``/``rejected``
  as text or as chat-message lists, including TRL's implicit-prompt form) or a builtin dataset under the
  shared data root (hh-rlhf, PandaLM, multiple-choice sets and SST-2 converted to pairs).
* ``load_choices`` / ``choices_to_pairs``: multiple-choice questions and the DPH paper's recipe for turning
  them into pairs (chosen = the correct option, rejected = a wrong option drawn uniformly, seeded).
* ``load_math`` / ``extract_final_answer`` / ``sample_math_pairs``: verifiable math problems and pairs made
  from the model's own samples (a correct sample vs an incorrect one).
* ``tokenize_pairs`` / ``collate_pairs``: THE tokenisation (``arbiter.backbone.encode_chat``) and padding.

Bad rows are never silently dropped and never crash a run: each is counted in a ``DataReport`` under a
reason with up to three short examples; a source with zero usable rows raises ``DataError`` naming the counts.

The data root is ``$ARBITER_DATA_DIR``, else ``/work/shared/data`` if it exists, else ``<repo>/../shared/data``.
"""

from arbiter.answers import canonical_number, extract_final_answer  # noqa: E402, F401  (re-exported: math answers)

from .choice import (  # noqa: F401
    _MC_INSTRUCTION,
    _SST2_INSTRUCTION,
    CHOICE_BUILTINS,
    LETTERS,
    SST2_LABELS,
    ChoiceQuestion,
    _choice_index,
    _lettered,
    _mc_rows,
    choices_to_pairs,
    load_choices,
    mc_prompt,
    sst2_prompt,
)
from .io import (  # noqa: F401
    _data_file,
    _is_user_file,
    _iter_jsonl,
    _open_text,
    _read_table,
    data_root,
)
from .math import (  # noqa: F401
    _MATH_INSTRUCTION,
    MATH_BUILTINS,
    MathProblem,
    _math_rows,
    is_correct,
    load_math,
    math_prompt,
    sample_math_pairs,
)
from .pairs import (  # noqa: F401
    PAIR_BUILTINS,
    _builtin_pairs,
    _load_hh,
    _load_pandalm,
    _pandalm_convert,
    load_pairs,
    save_pairs,
    split_pairs,
)
from .records import (  # noqa: F401
    _EXAMPLE_CHARS,
    HH_SPLITS,
    MAX_EXAMPLES,
    DataError,
    DataReport,
    PreferencePair,
    TokenizedPair,
    _fmt,
    _prompt_key,
)
from .rows import (  # noqa: F401
    _PAIR_COLUMNS,
    _ROLE,
    _ROLES,
    _TURN,
    _answer,
    _check_prompt,
    _common_prefix,
    _hh_convert,
    _json_safe,
    _messages,
    _pair_checks,
    _RowError,
    _rows_to_pairs,
    _trl_convert,
    hh_to_pair,
    parse_hh_dialogue,
    row_to_pair,
)
from .tokenize import (  # noqa: F401
    collate_pairs,
    collate_texts,
    tokenize_pairs,
)
