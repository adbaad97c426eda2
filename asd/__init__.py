"""asd: anomalous sound detection for machine condition monitoring."""

from omegaconf import OmegaConf

from asd.errors import AsdError

__all__ = ["AsdError"]
__version__ = "0.1.0"


def _choice(group: str, default: str) -> str:
    """`${asd_choice:experiment,default}`: the option chosen for a config group when Hydra composed
    the config from the command line; `default` without one (a config composed in code)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get(group) or default
    return default


OmegaConf.register_new_resolver("asd_choice", _choice, replace=True)
