"""Post-training: instruction tuning (SFT) and preference tuning (DPO) of a pretrained XLab model.

- ``records``: chat and preference files (JSON Lines, JSON, Parquet, CSV, Arrow) read, checked row by row and
  normalized; rendered to ids through the chat template (``xlabml.chat``) or as plain text.
- ``sft``: chats encoded once (cached) into token ids and the mask of trained targets; windows (padded or
  packed, as for pretraining) whose targets are the assistant replies only.
- ``preference``: (prompt, chosen, rejected) rows encoded into pairs of padded sequences, targets the responses.
- ``objective``: the ``Objective`` interface a model's ``objective`` option takes; ``dpo``: the DPO objective.

Data: ``data.format: chat`` or ``preference`` (``XLabDataModule``); model: ``model.objective`` (DPO).
Configs: ``conf/extra/sft.yaml``, ``conf/extra/dpo.yaml``.
"""
