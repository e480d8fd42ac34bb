"""The encoder classifier: a small encoder with one head per guard task, the cascade's first tier.

- `config.py`: `ClassifierConfig`, the YAML config of `reasonguard train classifier`;
- `items.py`, `teacher.py`: labelled items from guard records, benchmark files, or a teacher's
  predictions (distillation, with soft targets);
- `inputs.py`: one encoder sequence per item (request alone, or request and response as a pair);
- `model.py`: `EncoderClassifier`, and saving / loading a classifier folder;
- `kinds.py`: what a model folder holds (classifier, encoder, causal LM), read without loading;
- `train.py`: the training run, a `train.recipe.Recipe` on transformers' `Trainer`.

Example:
    >>> from reasonguard.classifier.config import load_classifier_config
    >>> from reasonguard.classifier.train import run_classifier
    >>> run_classifier(load_classifier_config("configs/classifier-minilm.yaml"))  # doctest: +SKIP
"""
