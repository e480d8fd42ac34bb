"""The cascade: fast verdicts first, reasoning only for the items inside uncertainty bands.

- `bands.py`: the bands, the escalation rule and the `cascade.json` a model folder keeps;
- `calibrate.py`: `reasonguard calibrate`: bands chosen for an F1 budget on labelled data;
- `holdout.py`: the seeded stratified split that keeps the reported numbers out of sample.
"""
