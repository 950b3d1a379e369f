"""Every use of a trained encoder: one resolver for encoder references (``encoders``),
Ray Data embedding (``embed``), the linear probe (``probe``), fine-tuning (``finetune``),
Ray Tune sweeps of both (``sweep``, ``finetune_sweep``, sharing ``tune_runs``), the
paper-style table (``report``), the whole suite as one job (``suite``), encoder exports
(``export``) and the HEAR 2021 API (``hear``)."""
