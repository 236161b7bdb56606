"""Search: which per-layer compression to train, and how trained runs compare.

Three commands: ``python -m train.search.sensitivity RUN_DIR`` measures every layer alone on the validation split,
``python -m train.search.allocate SENSITIVITY --budget B`` chooses one (bits, sparsity) per layer exactly and
writes it as a compress config, ``python -m train.search.compare RUNS_DIR`` tables every finished run.

Modules: grid (the vocabulary: a layer's setting, the grid, the count modes), measure, solve, formats
(sensitivity.json, allocation.json, run folders), configs (the compress config an allocation becomes), render
(markdown, PNG, TensorBoard: drawing libraries imported where they draw), the three commands, and stage: the
allocate stage, both steps inside a run, the one module of this package train/run.py imports.

The package imports compress, data, scoring, conf and train's build, config, distributed and objectives; nothing
imports train/run.py.
"""
