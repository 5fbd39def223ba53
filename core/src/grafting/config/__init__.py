"""Adapter configs: the base class every method's config extends, its field validators, PeftType/TaskType."""

from grafting.config.adapter_config import CONFIG_NAME, AdapterConfig, PeftType, TaskType, read_config_file

__all__ = ["CONFIG_NAME", "AdapterConfig", "PeftType", "TaskType", "read_config_file"]
