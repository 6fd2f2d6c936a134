"""LoRA training on a dataset version: ``arbitrage distill train PATH``.

Modules: ``config`` (TrainConfig, saved beside every adapter), ``data`` (Parquet rows -> chat
template token ids, loss on the answer only), ``train`` (Trainer, checkpoints and resume,
progress, the adapter folder and its manifest).
"""
