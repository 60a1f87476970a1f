"""BNA: re-fit BatchNorm statistics so trigger-carrying activations follow the clean distribution
(docs/method.md#bna). ``fit_twin`` fits one twin per detected target;
``fit_shared_twin`` one for several targets that share one trigger."""
from bna_gateway.mitigation.bna.config import BNAConfig, TwinFit
from bna_gateway.mitigation.bna.fit import fit_shared_twin, fit_twin

__all__ = ["BNAConfig", "TwinFit", "fit_shared_twin", "fit_twin"]
