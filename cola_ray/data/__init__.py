"""Bytes to pairs: where clips live (``storage``), how they decode (``audio``), how they are
packed (``shards``) and cached (``cache``), the streaming pair dataset (``pipeline``, the
only module of this wing that imports Ray), labelled downstream tasks (``tasks``) and the
generated demo corpus (``synthetic``). Nothing here imports MLflow or the model."""
