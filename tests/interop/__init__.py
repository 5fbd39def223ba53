"""PEFT interoperability through real methods (mostly LoRA): PEFT's API, attributes, wording, files and
outputs compared with peft's own. The core's own behaviour is tested on toy methods in ``tests/``."""
