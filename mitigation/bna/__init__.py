"""BNA: re-fit BatchNorm statistics so trigger-carrying activations follow the clean distribution."""
from bna_gateway.mitigation.bna.optimise import BNAConfig, TwinFit, fit_twin

__all__ = ["BNAConfig", "TwinFit", "fit_twin"]
