"""Evidence suite: does a model pretrained with VCReg transfer better, and at which setting?

    python -m benchmarks.evidence [--quick | --profile NAME] [--out DIR] [--jobs N] [--models ...] [--experiments ...]
    python -m benchmarks.evidence report [--results DIR] [--out FILE]

The protocol, one concern per module:

- :mod:`.data`: Fashion-MNIST (source) split once into a pretraining pool and a held-out validation set, its test
  split, scikit-learn digits (target) split into probe-train / validation / test, superclasses, long tail, moons;
- :mod:`.models`: the model families (transformers and timm, CNN and ViT) and where the penalty can go in each;
- :mod:`.features`: frozen features through ``hf_vcreg.capture.BlockCapture``, linear and few-shot probes,
  representation statistics;
- :mod:`.runs`: one run (train through ``VCRegTrainer``, measure), the ``runs.jsonl`` cache, the process pool;
- :mod:`.experiments`: profiles, the sweep and its selection rule (validation only), the headline (test);
- :mod:`.stats`: paired differences over seeds with Student-t intervals;
- :mod:`.reporting`: ``RESULTS.md`` and the plots, from the results files alone.
"""
