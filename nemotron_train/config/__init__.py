from nemotron_train.config.loader import ConfigError, load_config, save_config
from nemotron_train.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "save_config"]
