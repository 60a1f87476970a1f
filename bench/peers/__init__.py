"""The defences a user would pick instead of BNA, re-implemented for the peers benchmark (``bench/peers.py``).

Not part of the product: nothing under ``bna_gateway`` imports this package. One small module per peer:

model-level (a poisoned classifier and the defender's clean images in, a repaired classifier out)
  ``ft``      fine-tuning
  ``fp``      fine-pruning (Liu et al., 2018)
  ``nc``      Neural Cleanse unlearning (Wang et al., 2019), on *our* detection's trigger estimates
  ``anp``     adversarial neuron pruning (Wu & Wang, 2021): masks on BatchNorm neurons
  ``ft_sam``  fine-tuning with sharpness-aware minimisation (Zhu et al., ICCV 2023)

test-time input detectors (score each input; the threshold is set on the defender's clean images)
  ``strip``     STRIP (Gao et al., 2019): entropy of predictions on superimposed copies
  ``ibd_psc``   IBD-PSC (Hou et al., ICML 2024): consistency under amplified BatchNorm parameters
  ``scale_up``  SCALE-UP (Guo et al., ICLR 2023): consistency under pixel-value amplification

``common`` holds what they share (the fine-tuning loop, the detector threshold at a false-alarm budget).
Every module's docstring states its hyper-parameters and where they come from.
"""

MODEL_DEFENCES = ("ft", "fp", "nc", "anp", "ft_sam")
DETECTORS = ("strip", "ibd_psc", "scale_up")
