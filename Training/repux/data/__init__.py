"""Data for training and testing: curated-case datasets and synthetic CT phantoms.

- :mod:`repux.data.cases`: find image/label pairs in a dataset folder and check them.
- :mod:`repux.data.phantoms`: seeded synthetic abdominal CTs with FLARE organ labels.
- :mod:`repux.data.anatomy`: the random anatomy the phantoms sample (body frame, mm).
"""
