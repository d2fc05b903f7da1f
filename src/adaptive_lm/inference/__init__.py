"""The uses of a trained model: loading (``loading.from_pretrained``), the hub interface (``hub.LanguageModel``),
evaluation, generation, kNN-LM, n-best rescoring, CTC shallow fusion and conversion. Built on ``core`` only."""
