"""Limits on what one request may ask for, shared by validation, forms, the API's schemas and presets.

The cap on generated tokens is a setting (STEERLAB_MAX_NEW_TOKENS): it depends on the hardware.
"""

MAX_LAYERS = 20
MAX_FEATURES = 32
# Steered variants per run (a strength sweep's multipliers); a worker whose batch has fewer rows allows fewer.
MAX_VARIANTS = 8
# Each strength multiplier of a sweep; the coefficients it scales must also stay within the training's limit.
MAX_SWEEP_MULTIPLIER = 10_000.0
# A calibrated training's coefficients are multiples of each feature's max activation: |c| up to 100.
MAX_ABS_COEFFICIENT = 100.0
# An uncalibrated one's are in residual-stream units (a_i = 1), so its limit scales with the residual norm
# (Training.max_abs_coefficient); no training's limit exceeds this, the bound of the API's schema and the engine.
MAX_ABS_COEFFICIENT_HARD = 10_000.0
MAX_PROMPT_CHARS = 20_000
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
# A steering vector's examples per side: the engine holds out one in five to measure separation, so at least five
# (one held out, four to make the direction from); at most a thousand, a job of minutes on a CPU.
MIN_VECTOR_EXAMPLES = 5
MAX_VECTOR_EXAMPLES = 1000

# Larger numbers would overflow the database's integer columns in a query: a 500 instead of a 400.
MAX_ID = 2**63 - 1
MAX_INDEX = 2**31 - 1
MAX_PAGE = 1000
MAX_SEARCH_CHARS = 300
