"""The cascade: cheap verdicts first, dearer ones only for the items inside uncertainty bands.

- `bands.py`: the bands, the escalation rule and the `cascade.json` a model folder keeps;
- `calibrate.py`: `reasonguard calibrate`: bands chosen for an F1 budget on labelled data;
- `holdout.py`: the seeded stratified split that keeps the reported numbers out of sample;
- `tiers.py`: a cascade of any tiers (classifier, fast mode, reasoning), each naming its verdicts;
- `fit.py`: the bands of every tier of such a cascade, chosen and reported as `calibrate.py` does;
- `replay.py`: a folder of existing predictions as a guard (a replay of its outputs).
"""
