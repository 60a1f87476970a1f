"""The attack lab: what we evaluate the defence with, never what the defence runs on.

``attacks`` (backdoor specs and their triggers, built from the one trigger model in
``mitigation.triggers``), ``datasets`` (offline datasets with seeded splits; never a downloader),
``training`` (clean or poisoned classifiers) and ``metrics`` (ACC / ASR / SIA). The defence
(``mitigation.detection``, ``mitigation.bna``) imports none of it; an import-linter contract checks that.
"""
